//! Sequence classification runs: the labelled examples, their split, evaluation, and the
//! classifier as the training loop ([`crate::fit`]) drives it, the best adapter by validation F1.
use crate::checkpoint;
use crate::config::{TrainConfig, TrainSection};
use crate::data::{stratified_split, Dataset};
use crate::fit;
use crate::metrics::{evaluate, Evaluation};
use crate::optim::ParamGroup;
use crate::run::RunDir;
use crate::task::{Classifier, TaskSpec};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use graft_peft::loader::Registry;
use graft_tokenizer::LabelSet;
use serde_json::json;
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
        fit::median(&self.batch_seconds).unwrap_or(f64::NAN)
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
        let started = Instant::now();
        let logits = graft_model::ops::without_grad(|| classifier.forward(&encoded))?;
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

pub struct Outcome {
    pub run_dir: PathBuf,
    pub best: Evaluation,
    pub best_step: usize,
    pub steps: usize,
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
        let (model_dir, data_path) = config.model_and_data()?;
        let spec = TaskSpec::from_config(config, config.method_name()?, model_dir);
        let examples = Examples::from_file(&data_path, &spec)?;
        let (train_idx, val_idx) = stratified_split(
            &examples.labels,
            spec.labels.len(),
            config.data.val_fraction,
            t.seed,
        )?;
        let train_set = examples.subset(&train_idx);
        let total = t.total_steps(train_set.texts.len());
        Ok(Self {
            spec,
            val_set: examples.subset(&val_idx),
            train_set,
            total,
        })
    }

    fn classifier(&self, config: &TrainConfig, registry: &Registry) -> Result<Classifier> {
        new_classifier(&self.spec, config, registry, self.total)
    }
}

/// The base model with a fresh head and adapter for `spec`, seeded by the config, for a run of
/// `total` steps: what sequence and token classification runs start from.
pub(crate) fn new_classifier(
    spec: &TaskSpec,
    config: &TrainConfig,
    registry: &Registry,
    total: usize,
) -> Result<Classifier> {
    let plugin = registry.get(&spec.method)?;
    if config.model.dtype == crate::config::Precision::F16 {
        // f16 gradients underflow without loss scaling, which only train-lm has.
        return Err(Error::Config(
            "model.dtype = \"f16\" is for graft train-lm (it scales the loss); \
             classification trains in f32 or bf16"
                .into(),
        ));
    }
    Classifier::create(
        spec.clone(),
        plugin.method.as_ref(),
        &config.method_settings(),
        &graft_model::default_device()?,
        config.model.dtype.dtype(),
        config.train.seed,
        total,
    )
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
    let run = RunDir::create(out, RunDir::ADAPTER)?;
    run.write(RunDir::CONFIG, &resolved.to_toml()?)?;
    run_loop(&resolved, classifier, plan, run, None)
}

/// Continues the run in `dir` from its newest checkpoint, with the config it was started with.
pub fn resume(dir: &Path, registry: &Registry) -> Result<Outcome> {
    let config = TrainConfig::from_file(&dir.join(RunDir::CONFIG))?;
    let plan = Plan::new(&config)?;
    let checkpoint = fit::latest_checkpoint(dir)?;
    let classifier = plan.classifier(&config, registry)?;
    let run = RunDir::reopen(dir, checkpoint.state.done)?;
    run_loop(&config, classifier, plan, run, Some(checkpoint))
}

/// Classification as the training loop drives it: the training and validation examples, and
/// the classifier with its head (trained beside the method's tensors, at `head_lr`).
struct ClassifierTask {
    classifier: Classifier,
    train_set: Examples,
    val_set: Examples,
    eval_batch_size: usize,
    device: Device,
    /// The last evaluation's speed (a resumed run measures its own).
    eval_throughput: Throughput,
    data: fit::DataIdentity,
}

impl Examples {
    /// Adds every text and label, in order, to `hasher`.
    fn hash_into(&self, hasher: &mut fit::DataHasher) {
        hasher.number(self.texts.len());
        for (text, &label) in self.texts.iter().zip(&self.labels) {
            hasher.part(text.as_bytes()).number(label);
        }
    }
}

impl fit::Task for ClassifierTask {
    /// The tokenized texts and their labels.
    type Batch = (graft_tokenizer::EncodedBatch, Vec<u32>);

    fn examples(&self) -> usize {
        self.train_set.texts.len()
    }

    fn batch(&self, rows: &[usize]) -> Result<Self::Batch> {
        let texts: Vec<String> = rows
            .iter()
            .map(|&i| self.train_set.texts[i].clone())
            .collect();
        let labels = rows
            .iter()
            .map(|&i| self.train_set.labels[i] as u32)
            .collect();
        Ok((self.classifier.tokenizer.encode_batch(&texts)?, labels))
    }

    fn tokens(&self, (encoded, _): &Self::Batch) -> usize {
        encoded.batch * encoded.seq_len
    }

    fn units(&self, (encoded, _): &Self::Batch) -> usize {
        encoded.batch
    }

    fn accumulation(&self) -> fit::Accumulation {
        fit::Accumulation::MeanOfMicroBatches
    }

    fn loss_and_grads(
        &self,
        (encoded, labels): &Self::Batch,
        share: fit::Share,
    ) -> Result<(f64, candle_core::backprop::GradStore)> {
        let targets = Tensor::from_slice(labels, labels.len(), &self.device)?;
        let logits = self.classifier.forward(encoded)?;
        let loss = graft_model::loss::cross_entropy(&logits, &targets)?;
        self.classifier.weighed_grads(loss, share)
    }

    fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.classifier.trainable()
    }

    fn param_groups(&self, t: &TrainSection) -> Vec<ParamGroup> {
        self.classifier.param_groups(t)
    }

    fn adapter(&self) -> &dyn graft_peft::Adapter {
        self.classifier.adapter.as_ref()
    }

    fn adapter_mut(&mut self) -> &mut dyn graft_peft::Adapter {
        self.classifier.adapter.as_mut()
    }

    fn evaluate(&mut self) -> Result<Option<fit::Scored>> {
        let (_, evaluation, throughput) =
            evaluate_examples(&self.classifier, &self.val_set, self.eval_batch_size)?;
        self.eval_throughput = throughput;
        Ok(Some(fit::Scored {
            summary: format!(
                "validation accuracy {:.4}  precision {:.4}  recall {:.4}  F1 {:.4}  loss {:.4}",
                evaluation.accuracy,
                evaluation.precision,
                evaluation.recall,
                evaluation.f1,
                evaluation.loss
            ),
            score: evaluation.f1,
            curve: ("validation F1", evaluation.f1),
            metrics: serde_json::to_value(&evaluation).map_err(|e| Error::Config(e.to_string()))?,
        }))
    }

    fn save(&self, run: &RunDir) -> Result<()> {
        self.classifier.save(&run.adapter_dir())
    }

    fn data_identity(&self) -> Result<fit::DataIdentity> {
        Ok(self.data.clone())
    }

    fn report(&self, _state: &fit::LoopState, report: &mut serde_json::Value) {
        let head = fit::value_count(&self.classifier.head_vars());
        let base: usize = self
            .classifier
            .model
            .named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        let trainable = fit::value_count(&self.classifier.trainable());
        report["split"] = json!("validation");
        report["method"] = json!(self.classifier.spec.method);
        report["trainable_params"] = json!(trainable);
        report["total_params"] = json!(base + head);
        // Measured at the last evaluation, in full batches of eval_batch_size.
        report["eval_batch_size"] = json!(self.eval_batch_size);
        report["eval_tokens_per_s"] = json!(self.eval_throughput.tokens_per_s());
        report["eval_batch_seconds_median"] = json!(self.eval_throughput.batch_seconds_median());
    }
}

fn run_loop(
    config: &TrainConfig,
    classifier: Classifier,
    plan: Plan,
    mut run: RunDir,
    resume_from: Option<checkpoint::Checkpoint<fit::LoopState>>,
) -> Result<Outcome> {
    let t = &config.train;
    let Plan {
        spec,
        train_set,
        val_set,
        total,
    } = plan;
    let trainable_params = fit::value_count(&classifier.trainable());
    let intro = format!(
        "training {}: {} train / {} validation examples, {trainable_params} trainable parameters, {total} steps of {}",
        spec.method,
        train_set.texts.len(),
        val_set.texts.len(),
        t.batch_size * t.grad_accum,
    );
    let mut hasher = fit::DataHasher::default();
    train_set.hash_into(&mut hasher);
    val_set.hash_into(&mut hasher);
    let mut fields = json!({});
    fit::DataIdentity::fields("data", &config.data, &mut fields)?;
    let data = fit::DataIdentity {
        fields,
        train_examples: train_set.texts.len(),
        held_out_examples: val_set.texts.len(),
        content_sha256: hasher.finish(),
    };
    let mut task = ClassifierTask {
        data,
        device: classifier.model.head().device().clone(),
        classifier,
        train_set,
        val_set,
        eval_batch_size: t.eval_batch_size,
        eval_throughput: Throughput::default(),
    };
    let state = fit::fit(&mut task, t, total, &mut run, resume_from, &intro)?;
    let best = state
        .best
        .ok_or_else(|| Error::Config("no evaluation ran".into()))?;
    Ok(Outcome {
        run_dir: run.root.clone(),
        best: serde_json::from_value(best.metrics).map_err(|e| Error::Config(e.to_string()))?,
        best_step: best.step,
        steps: total,
    })
}
