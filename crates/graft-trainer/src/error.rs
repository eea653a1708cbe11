use std::path::PathBuf;

/// Errors of graft-trainer; each names the file, row or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The wrapped errors are boxed: they are large, and Result<_, Error> is everywhere.
    #[error(transparent)]
    Data(Box<crate::data::DataError>),
    #[error(transparent)]
    Tokenizer(Box<graft_tokenizer::Error>),
    #[error(transparent)]
    Model(Box<graft_model::Error>),
    #[error(transparent)]
    Peft(Box<graft_peft::Error>),
    #[error(transparent)]
    Plugin(#[from] graft_peft::PluginError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("{path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
    #[error("cannot resume from {checkpoint}: {reason}")]
    Resume { checkpoint: PathBuf, reason: String },
    #[error("training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the run is stopped, and {kept} keeps its last checkpoint (checkpoints/) and best adapter (adapter/); set train.on_non_finite = \"skip\" to skip such batches, or lower the learning rate")]
    NonFinite {
        step: usize,
        loss: f64,
        grad_norm: f64,
        kept: PathBuf,
    },
}

macro_rules! boxed_from {
    ($($variant:ident: $source:ty),*) => {$(
        impl From<$source> for Error {
            fn from(e: $source) -> Self {
                Error::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    Data: crate::data::DataError,
    Tokenizer: graft_tokenizer::Error,
    Model: graft_model::Error,
    Peft: graft_peft::Error
);

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}
