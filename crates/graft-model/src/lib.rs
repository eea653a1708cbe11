//! graft-model: transformer architectures written against PEFT injection hooks, weight loading,
//! and ops whose every step has a backward.
//!
//! Dependencies point one way (`cargo xtask modules` checks it): `ops` and `hooks` at the
//! bottom; `layers` and `weights` on them; `decoder` (plan, graph, cache) on those; `models`
//! (each architecture's config and plan) on `decoder`'s plan types; `formats` (safetensors,
//! gguf) read files into `weights`; `load` dispatches a path to a format and a model;
//! `classify` and `generate` on top.
pub mod classify;
pub mod decoder;
pub mod error;
pub mod formats;
pub mod generate;
pub mod hooks;
pub mod init;
pub mod layers;
pub mod load;
pub mod loss;
pub mod models;
pub mod ops;
pub mod quant;
pub mod runtime;
pub mod weights;
pub mod zoo;

pub use error::{Error, Result};
pub use hooks::{Acts, Hooks, LinearSite, LowRank, ModelInfo, NoHooks, SiteInfo};
pub use runtime::default_device;
