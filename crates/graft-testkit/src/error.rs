use std::path::PathBuf;

/// Why a check failed or could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Trainer(#[from] graft_trainer::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("method check failed: {0}")]
    Check(String),
}

/// What graft-trainer's own error wraps converts through it, so that a check reads as the
/// trainer would report it.
macro_rules! through_trainer {
    ($($source:ty),*) => {$(
        impl From<$source> for Error {
            fn from(e: $source) -> Self {
                Error::Trainer(e.into())
            }
        }
    )*};
}

through_trainer!(
    graft_trainer::data::DataError,
    graft_tokenizer::Error,
    graft_model::Error,
    graft_peft::Error,
    graft_peft::PluginError,
    candle_core::Error
);

pub type Result<T> = std::result::Result<T, Error>;
