use std::path::PathBuf;

/// Errors of graft-model: loading weights and configs, and building graphs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid model config: {source}")]
    Config {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: not found ({what}); is this a model folder? Expected config.json, model.safetensors and tokenizer.json")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error(
        "{dir}: the weights are PyTorch pickles ({files}), which graft does not read; convert \
         them to safetensors once, in that folder (names kept, one file per shard):\n  {command}\n\
         or load the model with transformers and save it with \
         `save_pretrained(DIR, safe_serialization=True)`"
    )]
    PickleWeights {
        dir: PathBuf,
        files: String,
        command: &'static str,
    },
    #[error("{path}: cannot read the weights: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is missing (looked for {tried})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        tried: String,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` holds {found}, expected floating-point weights")]
    TensorDtype {
        path: PathBuf,
        name: String,
        found: String,
    },
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    #[error("no linear site named `{0}` in this model")]
    UnknownSite(String),
    #[error(
        "`{key}` is kept quantized ({format}), so it cannot be {what}; load the base without \
         `quantize` for that"
    )]
    Quantized {
        key: String,
        format: String,
        what: &'static str,
    },
    #[error("model fetch failed: {0}")]
    Fetch(String),
    #[error("GRAFT_DEVICE={given}: this build runs on {known}")]
    DeviceName { given: String, known: &'static str },
}

pub type Result<T> = std::result::Result<T, Error>;
