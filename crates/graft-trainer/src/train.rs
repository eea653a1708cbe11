//! The training loop: batches, AdamW, schedule, clipping, accumulation, evaluation, best
//! checkpoint by validation F1.
use crate::checkpoint;
use crate::config::{OnNonFinite, TrainConfig};
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
use serde::{Deserialize, Serialize};
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
    /// Reads a labelled CSV or JSONL file (see [`Dataset::read`]).
    pub fn from_file(path: &Path, spec: &TaskSpec) -> Result<Self> {
        let template = graft_tokenizer::Template::parse(&spec.template)?;
        let mut required: Vec<&str> = template.columns();
        required.push(&spec.label_column);
        let data = Dataset::read(path, &required)?;
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

/// Inference speed over the full-size batches of an evaluation (the forward pass only, not
/// tokenisation): tokens counted with padding, as the model computes them.
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    pub batch_seconds: Vec<f64>,
    pub tokens: usize,
}

impl Throughput {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.batch_seconds.iter().sum::<f64>().max(1e-9)
    }

    pub fn batch_seconds_median(&self) -> f64 {
        median(&self.batch_seconds).unwrap_or(f64::NAN)
    }
}

/// Class predictions, the evaluation of `classifier` on `examples`, in batches, and the
/// forward passes' speed.
pub fn evaluate_examples(
    classifier: &Classifier,
    examples: &Examples,
    batch_size: usize,
) -> Result<(Vec<usize>, Evaluation, Throughput)> {
    let mut throughput = Throughput::default();
    let mut predicted = Vec::with_capacity(examples.texts.len());
    let mut loss_sum = 0.0;
    let device = candle_device(classifier);
    for (texts, labels) in examples
        .texts
        .chunks(batch_size.max(1))
        .zip(examples.labels.chunks(batch_size.max(1)))
    {
        let encoded = classifier.tokenizer.encode_batch(texts)?;
        let inputs = classifier.inputs(&encoded)?;
        let started = Instant::now();
        let logits = graft_model::ops::without_grad(|| {
            classifier.model.forward(&inputs, classifier.hooks())
        })?;
        if texts.len() == batch_size {
            throughput
                .batch_seconds
                .push(started.elapsed().as_secs_f64());
            throughput.tokens += encoded.batch * encoded.seq_len;
        }
        let targets = Tensor::from_iter(labels.iter().map(|&l| l as u32), &device)?;
        let loss = graft_model::loss::cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * texts.len() as f64;
        predicted.extend(
            graft_model::models::bert::argmax(&logits)?
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
    Ok((predicted, evaluation, throughput))
}

fn candle_device(classifier: &Classifier) -> Device {
    classifier.model.head().device().clone()
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

/// Where the loop stands after a step: with the tensors, optimizer and adapter state of a
/// checkpoint, everything a resumed run needs to continue exactly as an uninterrupted one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LoopState {
    /// Optimizer steps done.
    done: usize,
    epoch: usize,
    /// Shuffled order of the training rows for this epoch, and how far it has been read.
    order: Vec<usize>,
    cursor: usize,
    /// The shuffling generator's word position (a u128, as text: JSON numbers are f64).
    rng_position: String,
    best: Option<(Evaluation, usize)>,
    loss_curve: Vec<(f64, f64)>,
    f1_curve: Vec<(f64, f64)>,
    tokens: usize,
    /// Seconds of each step's forward, backward and update, tokenization excluded (as the
    /// PyTorch reference times its steps: `cargo xtask bench --reference`).
    step_seconds: Vec<f64>,
    /// Seconds spent tokenizing each step's batches.
    #[serde(default)]
    tokenize_seconds: Vec<f64>,
    /// Steps whose batch gave a NaN or infinite loss or gradient and was skipped.
    skipped: Vec<usize>,
    /// The last evaluation's speed (not checkpointed: a resumed run measures its own).
    #[serde(skip)]
    eval_throughput: Throughput,
}

/// A run's data, split, and step count, from a resolved config.
struct Plan {
    spec: TaskSpec,
    train_set: Examples,
    val_set: Examples,
    total: usize,
}

impl Plan {
    fn new(config: &TrainConfig) -> Result<Self> {
        config.validate()?;
        let t = &config.train;
        let field = |value: &Option<PathBuf>, what: &str| {
            value
                .clone()
                .ok_or_else(|| Error::Config(format!("the resolved config lacks {what}")))
        };
        let model_dir = field(&config.model.dir, "model.dir")?;
        let data_path = field(&config.data.train, "data.train")?;
        let spec = TaskSpec::from_config(config, config.method_name()?, model_dir);
        let examples = Examples::from_file(&data_path, &spec)?;
        let (train_idx, val_idx) = stratified_split(
            &examples.labels,
            spec.labels.len(),
            config.data.val_fraction,
            t.seed,
        )?;
        let train_set = examples.subset(&train_idx);
        let per_step = t.batch_size * t.grad_accum;
        let total = if t.max_steps > 0 {
            t.max_steps
        } else {
            t.epochs * train_set.texts.len().div_ceil(per_step).max(1)
        };
        Ok(Self {
            spec,
            val_set: examples.subset(&val_idx),
            train_set,
            total,
        })
    }

    /// The base model with a fresh head and adapter, seeded by the config.
    fn classifier(&self, config: &TrainConfig, registry: &Registry) -> Result<Classifier> {
        let plugin = registry.get(&self.spec.method)?;
        if config.model.dtype == crate::config::Precision::F16 {
            // f16 gradients underflow without loss scaling, which only train-lm has.
            return Err(Error::Config(
                "model.dtype = \"f16\" is for graft train-lm (it scales the loss); \
                 classification trains in f32 or bf16"
                    .into(),
            ));
        }
        Classifier::create(
            self.spec.clone(),
            plugin.method.as_ref(),
            &config.method_settings(),
            &graft_model::default_device()?,
            config.model.dtype.dtype(),
            config.train.seed,
            self.total,
        )
    }
}

/// Trains `config` with the method plugin from `registry`, writing the run into `out`.
pub fn train(
    config: &TrainConfig,
    registry: &Registry,
    model_dir: &Path,
    data_path: &Path,
    out: &Path,
) -> Result<Outcome> {
    let resolved = config.resolved(model_dir, data_path)?;
    // Read and check the data, plugin and model before anything is written.
    let plan = Plan::new(&resolved)?;
    let classifier = plan.classifier(&resolved, registry)?;
    let run = RunDir::create(out)?;
    run.write(RunDir::CONFIG, &resolved.to_toml()?)?;
    run_loop(&resolved, classifier, plan, run, None)
}

/// Continues the run in `dir` from its newest checkpoint, with the config it was started with.
pub fn resume(dir: &Path, registry: &Registry) -> Result<Outcome> {
    let config = TrainConfig::from_file(&dir.join(RunDir::CONFIG))?;
    let plan = Plan::new(&config)?;
    let device = graft_model::default_device()?;
    let checkpoint = checkpoint::read_latest::<LoopState>(dir, &device)?.ok_or_else(|| {
        Error::Config(format!(
            "{} has no checkpoint to resume from (train.checkpoint_every was 0, or the run stopped before its first)",
            dir.display()
        ))
    })?;
    let classifier = plan.classifier(&config, registry)?;
    let run = RunDir::reopen(dir, checkpoint.state.done)?;
    run_loop(&config, classifier, plan, run, Some(checkpoint))
}

fn run_loop(
    config: &TrainConfig,
    mut classifier: Classifier,
    plan: Plan,
    mut run: RunDir,
    resume_from: Option<checkpoint::Checkpoint<LoopState>>,
) -> Result<Outcome> {
    let t = &config.train;
    let Plan {
        spec,
        train_set,
        val_set,
        total,
    } = plan;
    let method_name = spec.method.clone();
    let device = graft_model::default_device()?;

    let trainable = classifier.trainable();
    let method_vars: Vec<_> = classifier
        .adapter
        .trainable()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let head_vars: Vec<_> = classifier.head_vars().into_iter().map(|(_, v)| v).collect();
    let all_vars: Vec<_> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let head_lr = t.head_lr.unwrap_or(t.lr);
    let trainable_params: usize = all_vars.iter().map(|v| v.elem_count()).sum();
    let total_params: usize = classifier
        .model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum::<usize>()
        + head_vars.iter().map(|v| v.elem_count()).sum::<usize>();
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

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(t.seed);
    let mut state = LoopState::default();
    if let Some(checkpoint) = resume_from {
        for (key, var) in &trainable {
            let saved = checkpoint
                .trainable
                .get(key)
                .ok_or_else(|| Error::Adapter {
                    path: checkpoint.dir.clone(),
                    reason: format!("the checkpoint lacks `{key}`"),
                })?;
            var.set(&saved.to_dtype(var.dtype())?)?;
        }
        optimizer.restore(checkpoint.state.done, &checkpoint.optimizer)?;
        classifier
            .adapter
            .restore_training_state(&checkpoint.adapter_state)?;
        let position: u128 = checkpoint.state.rng_position.parse().map_err(|_| {
            Error::Config(format!(
                "{}: bad RNG position `{}`",
                checkpoint.dir.display(),
                checkpoint.state.rng_position
            ))
        })?;
        rng.set_word_pos(position);
        state = checkpoint.state;
    }

    let per_step = t.batch_size * t.grad_accum;
    let warmup = (t.warmup_ratio * total as f64).round() as usize;
    let progress = Progress::new(total);
    progress.note(&format!(
        "training {method_name}: {} train / {} validation examples, {trainable_params} trainable parameters, {total} steps of {per_step}{}",
        train_set.texts.len(),
        val_set.texts.len(),
        if state.done > 0 { format!(", resuming after step {}", state.done) } else { String::new() },
    ));
    let started = Instant::now();
    classifier.adapter.set_training(true);

    for step in state.done..total {
        let step_started = Instant::now();
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut step_loss = 0.0;
        let mut tokenizing = std::time::Duration::ZERO;
        for _ in 0..t.grad_accum {
            if state.cursor >= state.order.len() {
                state.order = (0..train_set.texts.len()).collect();
                state.order.shuffle(&mut rng);
                state.cursor = 0;
                state.epoch += 1;
            }
            let take = (state.order.len() - state.cursor).min(t.batch_size);
            let batch: Vec<usize> = state.order[state.cursor..state.cursor + take].to_vec();
            state.cursor += take;
            let texts: Vec<String> = batch.iter().map(|&i| train_set.texts[i].clone()).collect();
            let tokenize_started = Instant::now();
            let encoded = classifier.tokenizer.encode_batch(&texts)?;
            tokenizing += tokenize_started.elapsed();
            // Tokens as computed, padding included (batches pad to their longest row).
            state.tokens += encoded.batch * encoded.seq_len;
            let inputs = classifier.inputs(&encoded)?;
            let targets =
                Tensor::from_iter(batch.iter().map(|&i| train_set.labels[i] as u32), &device)?;
            let logits = classifier
                .model
                .forward(&inputs, classifier.adapter.as_ref())?;
            let mut loss = graft_model::loss::cross_entropy(&logits, &targets)?;
            if let Some(extra) = classifier.adapter.extra_loss()? {
                loss = (loss + extra)?;
            }
            let loss = (loss / t.grad_accum as f64)?;
            step_loss += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            let micro = loss.backward()?;
            match grads.as_mut() {
                Some(g) => optim::accumulate(g, micro, &all_vars)?,
                None => grads = Some(micro),
            }
        }
        let mut grads = grads.ok_or_else(|| Error::Config("empty training set".into()))?;
        let norm = optim::global_norm(&grads, &all_vars)?;
        let done = step + 1;
        if !(step_loss.is_finite() && norm.is_finite()) {
            if t.on_non_finite == OnNonFinite::Stop {
                return Err(Error::NonFinite {
                    step: done,
                    loss: step_loss,
                    grad_norm: norm,
                    kept: run.root.clone(),
                });
            }
            progress.note(&format!(
                "step {done}: loss {step_loss}, gradient norm {norm}: batch skipped"
            ));
            state.skipped.push(done);
            run.log(&json!({ "step": done, "skipped": true, "loss": step_loss.to_string(), "grad_norm": norm.to_string() }))?;
        } else {
            if t.max_grad_norm > 0.0 && norm > t.max_grad_norm {
                optim::scale_grads(&mut grads, &all_vars, t.max_grad_norm / norm)?;
            }
            let factor = optim::lr_factor(t.schedule, step, total, warmup);
            optimizer.step(&grads, factor)?;
            // An update can overflow even from finite gradients; it cannot be undone, so the
            // run stops before such parameters reach a checkpoint, whatever the policy.
            if !optim::all_finite(&all_vars)? {
                return Err(Error::NonFinite {
                    step: done,
                    loss: step_loss,
                    grad_norm: norm,
                    kept: run.root.clone(),
                });
            }
            classifier.adapter.after_step(done, &grads)?;
            state
                .step_seconds
                .push((step_started.elapsed() - tokenizing).as_secs_f64());
            state.tokenize_seconds.push(tokenizing.as_secs_f64());
            state.loss_curve.push((done as f64, step_loss));
            let tokens_per_s =
                state.tokens as f64 / state.step_seconds.iter().sum::<f64>().max(1e-9);
            let log_now = done % t.log_every.max(1) == 0 || done == total;
            progress.step(
                done,
                total,
                &format!(
                    "loss {step_loss:.4}  {tokens_per_s:.0} tok/s  epoch {}",
                    state.epoch
                ),
                log_now,
            );
            if log_now {
                run.log(&json!({
                    "step": done, "epoch": state.epoch, "loss": step_loss, "lr": t.lr * factor,
                    "grad_norm": norm, "tokens_per_s": tokens_per_s,
                    "elapsed_s": started.elapsed().as_secs_f64(),
                }))?;
            }
        }

        let epoch_end = state.cursor >= state.order.len();
        let periodic = t.eval_every > 0 && done % t.eval_every == 0;
        if epoch_end || periodic || done == total {
            classifier.adapter.set_training(false);
            let (_, evaluation, throughput) =
                evaluate_examples(&classifier, &val_set, t.eval_batch_size)?;
            state.eval_throughput = throughput;
            classifier.adapter.set_training(true);
            state.f1_curve.push((done as f64, evaluation.f1));
            run.log(&json!({ "step": done, "epoch": state.epoch, "eval": evaluation }))?;
            progress.note(&format!(
                "step {done}: validation accuracy {:.4}  precision {:.4}  recall {:.4}  F1 {:.4}  loss {:.4}",
                evaluation.accuracy, evaluation.precision, evaluation.recall, evaluation.f1, evaluation.loss
            ));
            let improved = state
                .best
                .as_ref()
                .is_none_or(|(b, _)| evaluation.f1 > b.f1);
            if improved {
                classifier.save(&run.adapter_dir())?;
                state.best = Some((evaluation, done));
            }
            run.write(
                RunDir::CURVES,
                &plot::curves_svg(&state.loss_curve, &state.f1_curve),
            )?;
        }
        if t.checkpoint_every > 0 && (done % t.checkpoint_every == 0 || done == total) {
            state.done = done;
            state.rng_position = rng.get_word_pos().to_string();
            let tensors: Vec<(String, Tensor)> = trainable
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let (optimizer_step, moments) = optimizer.state();
            debug_assert_eq!(optimizer_step, done - state.skipped.len());
            checkpoint::write(
                &run.root,
                checkpoint::Parts {
                    step: done,
                    trainable: &tensors,
                    optimizer: &moments,
                    adapter_state: &classifier.adapter.training_state()?,
                    state: &state,
                },
            )?;
        }
    }
    progress.bar.finish_and_clear();
    let (best, best_step) = state
        .best
        .clone()
        .ok_or_else(|| Error::Config("no evaluation ran".into()))?;
    let mut report = serde_json::to_value(&best).map_err(|e| Error::Config(e.to_string()))?;
    report["step"] = json!(best_step);
    report["split"] = json!("validation");
    report["method"] = json!(method_name);
    report["steps"] = json!(total);
    report["skipped_steps"] = json!(state.skipped);
    report["train_seconds"] = json!(state.step_seconds.iter().sum::<f64>());
    report["trainable_params"] = json!(trainable_params);
    report["total_params"] = json!(total_params);
    report["step_seconds_median"] = json!(median_after_warmup(&state.step_seconds));
    report["tokenize_seconds_median"] = json!(median_after_warmup(&state.tokenize_seconds));
    // Steady-state speed: the mean tokens of a step over the median step after warm-up (the
    // running rate in the log includes the slow first steps).
    let steps_done = state.step_seconds.len().max(1) as f64;
    report["train_tokens_per_s"] = json!(
        state.tokens as f64 / steps_done / median_after_warmup(&state.step_seconds).max(1e-9)
    );
    report["peak_rss_mb"] = json!(peak_rss_mb());
    report["matmul"] = json!(graft_model::ops::matmul_path());
    // Measured at the last evaluation, in full batches of eval_batch_size.
    report["eval_batch_size"] = json!(t.eval_batch_size);
    report["eval_tokens_per_s"] = json!(state.eval_throughput.tokens_per_s());
    report["eval_batch_seconds_median"] = json!(state.eval_throughput.batch_seconds_median());
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
    median(&step_seconds[skip..]).unwrap_or(0.0)
}

/// The median (the mean of the middle two for an even count), if there are values.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// This process's peak resident memory in MiB (Linux's VmHWM), if the system reports it.
pub fn peak_rss_mb() -> Option<f64> {
    status_mb("VmHWM:")
}

/// This process's resident memory now, in MiB (Linux's VmRSS).
pub fn rss_mb() -> Option<f64> {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
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
            assert!(rss_mb().unwrap() > 1.0 && rss_mb() <= peak_rss_mb());
        }
    }
}
