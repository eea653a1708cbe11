//! graft-peft: the PEFT-method plugin trait, the plugin loader and ABI check, and Hugging Face
//! PEFT's adapter file layout.
//!
//! Built as a Rust `dylib`: the host and every plugin link this one library, and with it one
//! copy of candle (whose process-wide tensor-id counter keys gradients). Plugins use candle and
//! the model types through the re-exports below, never through a dependency of their own.
pub mod abi;
pub mod adapter;
pub mod config;
pub mod error;
pub mod guard;
pub mod loader;
pub mod method;
pub mod prompt_learning;
pub mod sites;
pub mod targets;

pub use candle_core as candle;
pub use candle_nn;
pub use error::{Error, PluginError, Result};
pub use graft_model;
pub use method::{Adapter, AttachContext, MergeDelta, Method, PluginMethod, Saved};
pub use serde;
pub use serde_json;
pub use sites::SiteLayers;
pub use targets::{DefaultTargets, TargetModules};
