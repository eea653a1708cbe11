//! A training run's configuration: TOML, every field defaulted, unknown keys refused.
use crate::{Error, Result};
use graft_model::models::bert::Pooling;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    /// `name` picks the plugin; every other key is the method's own (PEFT's field names).
    pub method: toml::Table,
    pub plugins: PluginsSection,
}

/// Where to look for method plugins, after `--plugin-dir` and before `$GRAFT_PLUGIN_PATH` and
/// the binary's own directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSection {
    pub dirs: Vec<PathBuf>,
}

/// The dtype the frozen base weights and the activations are kept in. Trainable tensors and
/// the optimizer's state stay f32 whatever it is, and norms, softmax and the loss compute in
/// f32 (mixed precision, as autocast does it); f16 training scales the loss. f64 (everything
/// in f64) is for finite-difference checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
    F64,
}

impl Precision {
    pub const NAMES: [&'static str; 4] = ["f32", "bf16", "f16", "f64"];

    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
            Self::F64 => candle_core::DType::F64,
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "f64" => Ok(Self::F64),
            other => Err(Error::Config(format!(
                "dtype `{other}`: expected one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A model folder (config.json, model.safetensors, tokenizer.json) or a hub id
    /// (`owner/name[@revision]`, fetched; a local folder of that name wins); empty: `name`.
    pub dir: Option<PathBuf>,
    /// A model graft knows how to fetch (`minilm`) or a hub id, used when `dir` is not set.
    pub name: String,
    pub pooling: Pooling,
    pub max_len: usize,
    /// tokenizer.json when the model folder has none (a GGUF model).
    pub tokenizer: Option<PathBuf>,
    /// The base weights' and activations' dtype: `f32` or `bf16` (`f16` needs the loss
    /// scaling that only train-lm has).
    pub dtype: Precision,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            dir: None,
            name: "minilm".into(),
            pooling: Pooling::Pooler,
            max_len: 128,
            tokenizer: None,
            dtype: Precision::F32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Labelled CSV; empty: `../shared/data/abstracts/train.csv` if present, else the demo set.
    pub train: Option<PathBuf>,
    /// Model input built from CSV columns.
    pub template: String,
    pub label_column: String,
    /// Class labels as written in the CSV; index order is the classifier's output order.
    pub labels: Vec<String>,
    /// Share of each class held out for validation (of the rows, for token classification).
    pub val_fraction: f64,
    /// Token classification (with `model.pooling = "tokens"`): the column whose phrases
    /// (separated by semicolons, or commas) are marked in the template's text, and `labels`
    /// are the tags (`O`, `B`, `I`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phrase_column: Option<String>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: None,
            template: graft_tokenizer::DEFAULT_TEMPLATE.into(),
            label_column: "label".into(),
            labels: vec!["0".into(), "1".into()],
            val_fraction: 0.1,
            phrase_column: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub seed: u64,
    pub epochs: usize,
    /// Stops after this many optimizer steps even mid-epoch (0: no limit).
    pub max_steps: usize,
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed (averaged) before one optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    /// Learning rate of the classifier head (default: `lr`).
    pub head_lr: Option<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Share of the steps spent warming the learning rate up from 0.
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    /// Global gradient-norm limit (0: no clipping).
    pub max_grad_norm: f64,
    /// Log a metrics line every this many steps.
    pub log_every: usize,
    /// Also evaluate every this many steps (0: only at the end of each epoch and of training).
    pub eval_every: usize,
    pub eval_batch_size: usize,
    /// Write a checkpoint (trainable tensors, optimizer, data order, RNG) every this many steps
    /// for `--resume` (0: never).
    pub checkpoint_every: usize,
    /// What a NaN or infinite loss or gradient does: stop the run (keeping the last good
    /// checkpoint and best adapter) or skip that batch and count it.
    pub on_non_finite: OnNonFinite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    Stop,
    Skip,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            seed: 42,
            epochs: 1,
            max_steps: 0,
            batch_size: 8,
            grad_accum: 1,
            lr: 5e-4,
            head_lr: None,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_ratio: 0.06,
            schedule: Schedule::Linear,
            max_grad_norm: 1.0,
            log_every: 10,
            eval_every: 0,
            eval_batch_size: 32,
            checkpoint_every: 50,
            on_non_finite: OnNonFinite::Stop,
        }
    }
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(in_file(path))
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text)
            .map_err(|e| Error::Config(graft_peft::config::with_suggestion(&e.to_string())))?;
        config.validate()?;
        Ok(config)
    }

    /// The config a run records: the model folder and data it trains on, and every path in
    /// it, made absolute, so that `eval`, `predict` and `--resume` work from any directory.
    pub fn resolved(&self, model_dir: &Path, data: &Path) -> Result<Self> {
        let mut resolved = self.clone();
        resolved.model.dir = Some(absolute(model_dir)?);
        resolved.data.train = Some(absolute(data)?);
        resolved.model.tokenizer = self.model.tokenizer.as_deref().map(absolute).transpose()?;
        resolved.plugins.dirs = self
            .plugins
            .dirs
            .iter()
            .map(|d| absolute(d))
            .collect::<Result<_>>()?;
        Ok(resolved)
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))
    }

    pub fn method_name(&self) -> Result<&str> {
        method_name(&self.method)
    }

    /// The model folder and data file of a resolved config ([`TrainConfig::resolved`]).
    pub fn model_and_data(&self) -> Result<(PathBuf, PathBuf)> {
        let field = |value: &Option<PathBuf>, what: &str| {
            value
                .clone()
                .ok_or_else(|| Error::Config(format!("the resolved config lacks {what}")))
        };
        Ok((
            field(&self.model.dir, "model.dir")?,
            field(&self.data.train, "data.train")?,
        ))
    }

    /// Token classification takes its phrases from `data.phrase_column` and its tags from
    /// `data.labels` (O, B, I); sequence classification takes neither.
    fn check_task(&self) -> Result<()> {
        let tokens = self.model.pooling == Pooling::Tokens;
        match (tokens, &self.data.phrase_column) {
            (true, None) => Err(Error::Config(
                "model.pooling = \"tokens\" labels every token: set data.phrase_column to the \
                 column of phrases to mark, and data.labels to the tags (e.g. [\"O\", \"B\", \"I\"])"
                    .into(),
            )),
            (false, Some(column)) => Err(Error::Config(format!(
                "data.phrase_column = {column:?} is for token classification: set \
                 model.pooling = \"tokens\" (or drop the column for sequence classification)"
            ))),
            (true, Some(_)) => {
                let bad: Vec<&String> = self
                    .data
                    .labels
                    .iter()
                    .filter(|l| graft_tokenizer::Tag::parse(l).is_none())
                    .collect();
                if !bad.is_empty() || !self.data.labels.iter().any(|l| l == "O") {
                    return Err(Error::Config(format!(
                        "data.labels {:?}: a token classifier's labels are tags, O and B/I (or \
                         B-TYPE/I-TYPE); not tags: {bad:?}",
                        self.data.labels
                    )));
                }
                Ok(())
            }
            (false, None) => Ok(()),
        }
    }

    /// The method's own settings as JSON (the table without `name`), for the plugin.
    pub fn method_settings(&self) -> serde_json::Value {
        method_settings(&self.method)
    }

    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.check_task()?;
        let labels = &self.data.labels;
        let distinct: std::collections::BTreeSet<&String> = labels.iter().collect();
        let checks = [
            (
                self.model.max_len > 0,
                "model.max_len must be at least 1".to_string(),
            ),
            (
                self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0,
                format!(
                    "data.val_fraction must be in (0, 1), found {}",
                    self.data.val_fraction
                ),
            ),
            (
                labels.len() >= 2 && distinct.len() == labels.len(),
                format!("data.labels must name at least two distinct classes, found {labels:?}"),
            ),
        ];
        first_failure(checks)
    }
}

/// Refuses a token classifier ([`Pooling::Tokens`]) where a command reads one label a row
/// (eval, predict, merge).
pub fn labels_sequences(pooling: Pooling) -> Result<()> {
    if pooling == Pooling::Tokens {
        return Err(Error::Config(
            "this adapter labels every token (model.pooling = \"tokens\"), and this command \
             reads one label a row: a sequence classifier's"
                .into(),
        ));
    }
    Ok(())
}

/// Prefixes a config error with the file it is about.
pub(crate) fn in_file(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Config(reason) => Error::Config(format!("{}: {reason}", path.display())),
        other => other,
    }
}

/// The first failed check's message as a config error.
fn first_failure<const N: usize>(checks: [(bool, String); N]) -> Result<()> {
    match checks.into_iter().find(|(ok, _)| !ok) {
        Some((_, message)) => Err(Error::Config(message)),
        None => Ok(()),
    }
}

impl TrainSection {
    /// Optimizer steps of a run over `examples` training examples: `max_steps`, else whole
    /// epochs of `batch_size` x `grad_accum` (the last step of each taking what is left).
    pub fn total_steps(&self, examples: usize) -> usize {
        if self.max_steps > 0 {
            self.max_steps
        } else {
            self.epochs * examples.div_ceil(self.batch_size * self.grad_accum).max(1)
        }
    }

    /// What the optimiser, the schedule and the batching divide by or step with; shared by
    /// classification and causal-LM runs.
    pub fn validate(&self) -> Result<()> {
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let non_negative = |v: f64| v >= 0.0 && v.is_finite();
        let below_one = |v: f64| (0.0..1.0).contains(&v);
        let checks = [
            (
                self.batch_size > 0,
                "train.batch_size must be at least 1".to_string(),
            ),
            (
                self.grad_accum > 0,
                "train.grad_accum must be at least 1".into(),
            ),
            (
                self.eval_batch_size > 0,
                "train.eval_batch_size must be at least 1".into(),
            ),
            (
                self.epochs > 0 || self.max_steps > 0,
                "train.epochs or train.max_steps must be positive".into(),
            ),
            (
                positive(self.lr),
                format!("train.lr must be positive, found {}", self.lr),
            ),
            (
                self.head_lr.is_none_or(positive),
                format!("train.head_lr must be positive, found {:?}", self.head_lr),
            ),
            (
                non_negative(self.weight_decay),
                format!(
                    "train.weight_decay must be finite and not negative, found {}",
                    self.weight_decay
                ),
            ),
            (
                below_one(self.beta1) && below_one(self.beta2),
                format!(
                    "train.beta1 and train.beta2 must be in [0, 1), found {} and {}",
                    self.beta1, self.beta2
                ),
            ),
            (
                positive(self.eps),
                format!("train.eps must be positive, found {}", self.eps),
            ),
            (
                below_one(self.warmup_ratio),
                format!(
                    "train.warmup_ratio must be in [0, 1), found {}",
                    self.warmup_ratio
                ),
            ),
            (
                non_negative(self.max_grad_norm),
                format!(
                    "train.max_grad_norm must be finite and not negative (0: no clipping), found {}",
                    self.max_grad_norm
                ),
            ),
        ];
        first_failure(checks)
    }
}

/// The plugin a `[method]` table names.
pub fn method_name(method: &toml::Table) -> Result<&str> {
    method
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::Config("[method] needs `name`, e.g. name = \"lora\"".into()))
}

/// A `[method]` table's own settings as JSON (without `name`), for the plugin.
pub fn method_settings(method: &toml::Table) -> serde_json::Value {
    let mut table = method.clone();
    table.remove("name");
    serde_json::to_value(table).unwrap_or(serde_json::Value::Null)
}

/// A JSON file graft wrote beside an adapter (`graft_task.json`, `graft_lm_task.json`).
pub fn read_task_file<T: serde::de::DeserializeOwned>(
    dir: &Path,
    file: &str,
    what: &str,
) -> Result<T> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).map_err(crate::error::io_error(&path))?;
    serde_json::from_str(&text).map_err(|e| Error::Adapter {
        path,
        reason: format!("not a graft {what} file: {e}"),
    })
}

/// `path` made absolute against the current directory (not resolving links), so that a file
/// written now names it the same way whatever directory reads it later.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(crate::error::io_error(path))
}

/// Writes what [`read_task_file`] reads, atomically.
pub fn write_task_file<T: serde::Serialize>(dir: &Path, file: &str, spec: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(spec).map_err(|e| Error::Config(e.to_string()))?;
    graft_model::formats::safetensors::write_atomic(&dir.join(file), text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token classification needs its phrase column and tags; a sequence task neither.
    #[test]
    fn a_token_task_needs_phrases_and_tags() {
        let mut config = TrainConfig::default();
        assert!(config.validate().is_ok());
        config.model.pooling = Pooling::Tokens;
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("data.phrase_column"), "{e}");
        config.data.phrase_column = Some("Keywords".into());
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("not tags: [\"0\", \"1\"]"), "{e}");
        config.data.labels = vec!["O".into(), "B".into(), "I".into()];
        config.validate().unwrap();
        config.model.pooling = Pooling::Pooler;
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("is for token classification"), "{e}");
    }
}
