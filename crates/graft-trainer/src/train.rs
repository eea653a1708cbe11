//! The training loop: batches, AdamW, schedule, clipping, accumulation, evaluation, best
//! checkpoint by validation F1.
use crate::config::TrainConfig;
use crate::data::{stratified_split, Dataset};
use crate::metrics::{evaluate, Evaluation};
use crate::optim::{self, AdamW, ParamGroup};
use crate::run::RunDir;
use crate::task::{Classifier, TaskSpec};
use crate::{plot, Error, Result};
use candle_core::{Device, Tensor};
use graft_peft::loader::Registry;
use graft_tokenizer::LabelSet;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Labelled texts ready for the model.
pub struct Examples {
    pub texts: Vec<String>,
    pub labels: Vec<usize>,
}

impl Examples {
    pub fn from_csv(path: &Path, spec: &TaskSpec) -> Result<Self> {
        let template = graft_tokenizer::Template::parse(&spec.template)?;
        let mut required: Vec<&str> = template.columns();
        required.push(&spec.label_column);
        let data = Dataset::read_csv(path, &required)?;
        let labels = LabelSet::new(spec.labels.clone())?;
        Ok(Self {
            texts: data.texts(&template)?,
            labels: data.labels(&spec.label_column, &labels)?,
        })
    }

    fn subset(&self, indices: &[usize]) -> Self {
        Self {
            texts: indices.iter().map(|&i| self.texts[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// Class predictions and the evaluation of `classifier` on `examples`, in batches.
pub fn evaluate_examples(
    classifier: &Classifier,
    examples: &Examples,
    batch_size: usize,
) -> Result<(Vec<usize>, Evaluation)> {
    let mut predicted = Vec::with_capacity(examples.texts.len());
    let mut loss_sum = 0.0;
    let device = candle_device(classifier);
    for (texts, labels) in examples
        .texts
        .chunks(batch_size.max(1))
        .zip(examples.labels.chunks(batch_size.max(1)))
    {
        let logits = classifier.logits(texts)?.detach();
        let targets = Tensor::from_iter(labels.iter().map(|&l| l as u32), &device)?;
        let loss = graft_model::cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * texts.len() as f64;
        predicted.extend(
            graft_model::bert::argmax(&logits)?
                .into_iter()
                .map(|p| p as usize),
        );
    }
    let n = examples.labels.len().max(1) as f64;
    let evaluation = evaluate(
        &examples.labels,
        &predicted,
        classifier.labels.len(),
        loss_sum / n,
    );
    Ok((predicted, evaluation))
}

fn candle_device(classifier: &Classifier) -> Device {
    classifier.model.head.vars()[0].1.device().clone()
}

/// Reports training progress: a bar on a terminal, a line per logged step otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
    plain: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        let plain = !std::io::stderr().is_terminal();
        let bar = if plain {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  elapsed {elapsed_precise}  ETA {eta_precise}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        };
        Self { bar, plain }
    }

    fn step(&self, step: usize, total: usize, message: &str, log: bool) {
        self.bar.set_position(step as u64);
        self.bar.set_message(message.to_string());
        if self.plain && log {
            eprintln!("step {step}/{total}  {message}");
        }
    }

    fn note(&self, message: &str) {
        self.bar.suspend(|| eprintln!("{message}"));
    }
}

pub struct Outcome {
    pub run_dir: PathBuf,
    pub best: Evaluation,
    pub best_step: usize,
    pub steps: usize,
}

/// Trains `config` with the method plugin from `registry`, writing the run into `out`.
pub fn train(
    config: &TrainConfig,
    registry: &Registry,
    model_dir: &Path,
    data_path: &Path,
    out: &Path,
) -> Result<Outcome> {
    config.validate()?;
    let t = &config.train;
    let method_name = config.method_name()?.to_string();
    let plugin = registry.get(&method_name)?;
    let spec = TaskSpec {
        method: method_name.clone(),
        model_dir: model_dir.to_path_buf(),
        labels: config.data.labels.clone(),
        label_column: config.data.label_column.clone(),
        template: config.data.template.clone(),
        pooling: config.model.pooling,
        max_len: config.model.max_len,
    };
    // Read and check the data before anything is written or loaded.
    let examples = Examples::from_csv(data_path, &spec)?;
    let (train_idx, val_idx) = stratified_split(
        &examples.labels,
        spec.labels.len(),
        config.data.val_fraction,
        t.seed,
    )?;
    let train_set = examples.subset(&train_idx);
    let val_set = examples.subset(&val_idx);

    let per_step = t.batch_size * t.grad_accum;
    let steps_per_epoch = train_set.texts.len().div_ceil(per_step).max(1);
    let total = if t.max_steps > 0 {
        t.max_steps
    } else {
        t.epochs * steps_per_epoch
    };

    let device = graft_model::default_device()?;
    let mut classifier = Classifier::create(
        spec,
        plugin.method.as_ref(),
        &config.method_settings(),
        &device,
        candle_core::DType::F32,
        t.seed,
        total,
    )?;
    let mut run = RunDir::create(out)?;
    let mut resolved = config.clone();
    resolved.model.dir = Some(model_dir.to_path_buf());
    resolved.data.train = Some(data_path.to_path_buf());
    run.write(RunDir::CONFIG, &resolved.to_toml()?)?;

    let method_vars: Vec<_> = classifier
        .adapter
        .trainable()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let head_vars: Vec<_> = classifier.head_vars().into_iter().map(|(_, v)| v).collect();
    let all_vars: Vec<_> = method_vars.iter().chain(&head_vars).cloned().collect();
    let head_lr = t.head_lr.unwrap_or(t.lr);
    let mut optimizer = AdamW::new(
        vec![
            ParamGroup {
                vars: method_vars,
                lr: t.lr,
                weight_decay: t.weight_decay,
            },
            ParamGroup {
                vars: head_vars,
                lr: head_lr,
                weight_decay: t.weight_decay,
            },
        ],
        t.beta1,
        t.beta2,
        t.eps,
    )?;
    let trainable_params: usize = all_vars.iter().map(|v| v.elem_count()).sum();
    let total_params: usize = classifier
        .model
        .bert
        .params()
        .iter()
        .map(|p| p.value().elem_count())
        .sum::<usize>()
        + classifier
            .head_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>();

    let warmup = (t.warmup_ratio * total as f64).round() as usize;
    let progress = Progress::new(total);
    progress.note(&format!(
        "training {method_name}: {} train / {} validation examples, {trainable_params} trainable parameters, {total} steps of {per_step}",
        train_set.texts.len(),
        val_set.texts.len(),
    ));

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(t.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut cursor = 0;
    let mut epoch = 0;
    let mut best: Option<(Evaluation, usize)> = None;
    let mut loss_curve = Vec::new();
    let mut f1_curve = Vec::new();
    let started = Instant::now();
    let mut tokens = 0usize;
    // Training time alone (evaluation excluded), per step.
    let mut step_seconds = Vec::with_capacity(total);
    let mut last_evaluated = 0;
    classifier.adapter.set_training(true);

    for step in 0..total {
        let step_started = Instant::now();
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut step_loss = 0.0;
        for _ in 0..t.grad_accum {
            if cursor >= order.len() {
                order = (0..train_set.texts.len()).collect();
                order.shuffle(&mut rng);
                cursor = 0;
                epoch += 1;
            }
            let take = (order.len() - cursor).min(t.batch_size);
            let batch: Vec<usize> = order[cursor..cursor + take].to_vec();
            cursor += take;
            let texts: Vec<String> = batch.iter().map(|&i| train_set.texts[i].clone()).collect();
            let encoded = classifier.tokenizer.encode_batch(&texts)?;
            tokens += encoded.attention_mask.iter().filter(|&&m| m == 1).count();
            let inputs = classifier.inputs(&encoded)?;
            let targets =
                Tensor::from_iter(batch.iter().map(|&i| train_set.labels[i] as u32), &device)?;
            let logits = classifier
                .model
                .forward(&inputs, classifier.adapter.as_ref())?;
            let mut loss = graft_model::cross_entropy(&logits, &targets)?;
            if let Some(extra) = classifier.adapter.extra_loss()? {
                loss = (loss + extra)?;
            }
            let loss = (loss / t.grad_accum as f64)?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::NonFinite {
                    step: step + 1,
                    loss: value,
                    kept: run.adapter_dir(),
                });
            }
            step_loss += value;
            let micro = loss.backward()?;
            match grads.as_mut() {
                Some(g) => optim::accumulate(g, micro, &all_vars)?,
                None => grads = Some(micro),
            }
        }
        let mut grads = grads.ok_or_else(|| Error::Config("empty training set".into()))?;
        let norm = optim::global_norm(&grads, &all_vars)?;
        if !norm.is_finite() {
            return Err(Error::NonFinite {
                step: step + 1,
                loss: norm,
                kept: run.adapter_dir(),
            });
        }
        if t.max_grad_norm > 0.0 && norm > t.max_grad_norm {
            optim::scale_grads(&mut grads, &all_vars, t.max_grad_norm / norm)?;
        }
        let factor = optim::lr_factor(t.schedule, step, total, warmup);
        optimizer.step(&grads, factor)?;
        classifier.adapter.after_step(step + 1, &grads)?;
        step_seconds.push(step_started.elapsed().as_secs_f64());

        let done = step + 1;
        let elapsed = started.elapsed().as_secs_f64();
        let tokens_per_s = tokens as f64 / step_seconds.iter().sum::<f64>().max(1e-9);
        loss_curve.push((done as f64, step_loss));
        let log_now = done % t.log_every.max(1) == 0 || done == total;
        progress.step(
            done,
            total,
            &format!("loss {step_loss:.4}  {tokens_per_s:.0} tok/s  epoch {epoch}"),
            log_now,
        );
        if log_now {
            run.log(&json!({
                "step": done, "epoch": epoch, "loss": step_loss, "lr": t.lr * factor,
                "grad_norm": norm, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed,
            }))?;
        }

        let epoch_end = cursor >= order.len() && t.grad_accum > 0;
        let periodic = t.eval_every > 0 && done % t.eval_every == 0;
        if epoch_end || periodic || done == total {
            classifier.adapter.set_training(false);
            let (_, evaluation) = evaluate_examples(&classifier, &val_set, t.eval_batch_size)?;
            classifier.adapter.set_training(true);
            last_evaluated = done;
            f1_curve.push((done as f64, evaluation.f1));
            run.log(&json!({ "step": done, "epoch": epoch, "eval": evaluation }))?;
            progress.note(&format!(
                "step {done}: validation accuracy {:.4}  precision {:.4}  recall {:.4}  F1 {:.4}  loss {:.4}",
                evaluation.accuracy, evaluation.precision, evaluation.recall, evaluation.f1, evaluation.loss
            ));
            let improved = best.as_ref().is_none_or(|(b, _)| evaluation.f1 > b.f1);
            if improved {
                classifier.save(&run.adapter_dir())?;
                best = Some((evaluation, done));
            }
            run.write(RunDir::CURVES, &plot::curves_svg(&loss_curve, &f1_curve))?;
        }
    }
    debug_assert_eq!(last_evaluated, total);
    progress.bar.finish_and_clear();
    let (best, best_step) = best.ok_or_else(|| Error::Config("no evaluation ran".into()))?;
    let mut report = serde_json::to_value(&best).map_err(|e| Error::Config(e.to_string()))?;
    report["step"] = json!(best_step);
    report["split"] = json!("validation");
    report["method"] = json!(method_name);
    report["steps"] = json!(total);
    report["train_seconds"] = json!(started.elapsed().as_secs_f64());
    report["trainable_params"] = json!(trainable_params);
    report["total_params"] = json!(total_params);
    report["step_seconds_median"] = json!(median_after_warmup(&step_seconds));
    report["train_tokens_per_s"] =
        json!(tokens as f64 / step_seconds.iter().sum::<f64>().max(1e-9));
    report["peak_rss_mb"] = json!(peak_rss_mb());
    run.write(
        RunDir::EVAL,
        &serde_json::to_string_pretty(&report).map_err(|e| Error::Config(e.to_string()))?,
    )?;
    Ok(Outcome {
        run_dir: run.root.clone(),
        best,
        best_step,
        steps: total,
    })
}

/// Median step time, the first two steps (allocation warm-up) left out when there are more.
pub fn median_after_warmup(step_seconds: &[f64]) -> f64 {
    let skip = if step_seconds.len() > 4 { 2 } else { 0 };
    let mut sorted: Vec<f64> = step_seconds[skip..].to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// This process's peak resident memory in MiB (Linux's VmHWM), if the system reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_skips_warm_up_steps() {
        assert_eq!(median_after_warmup(&[9.0, 9.0, 1.0, 2.0, 3.0]), 2.0);
        assert_eq!(median_after_warmup(&[1.0, 3.0]), 2.0);
        assert_eq!(median_after_warmup(&[]), 0.0);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb().unwrap() > 1.0);
        }
    }
}
