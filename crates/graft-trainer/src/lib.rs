//! graft-trainer: data sets (and sequence-tagging data), the training loop, optimiser and
//! schedules, metrics and run directories.
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod fit;
pub mod inspect;
pub mod keywords;
pub mod lm;
pub mod lm_train;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod run;
pub mod tag_train;
pub mod tagging;
pub mod task;
pub mod tensorboard;
pub mod thudm;
pub mod train;

pub use config::TrainConfig;
pub use error::{Error, Result};
