use std::path::{Path, PathBuf};

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
    #[error("{path}: not found ({what}); is this a model folder? Expected config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error(
        "{path}: refused: {what}. A PyTorch checkpoint is a pickle, which Python would run; \
         graft reads it as data and only the tensor-rebuilding globals a state dict needs"
    )]
    PickleRefused { path: PathBuf, what: String },
    #[error(
        "{path}: refused: {what}. torch.save and transformers never write this; graft bounds \
         what a checkpoint makes it build, so that a forged file costs no more than a real one"
    )]
    CheckpointRefused { path: PathBuf, what: String },
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
    #[error("{path}: cannot export: {reason}")]
    Export { path: PathBuf, reason: String },
    #[error("model fetch failed: {0}")]
    Fetch(String),
    #[error("GRAFT_DEVICE={given}: this build runs on {known}")]
    DeviceName { given: String, known: &'static str },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// What an I/O error on opening `path` is: the file is missing (it holds `what`), or
    /// another failure.
    pub fn opening(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile { path, what },
            _ => Error::Io { path, source },
        }
    }
}
