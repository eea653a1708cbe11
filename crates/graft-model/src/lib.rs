//! graft-model: transformer architectures written against PEFT injection hooks, weight loading,
//! and ops whose every step has a backward.
pub mod bert;
pub mod error;
pub mod hooks;
pub mod init;
pub mod layers;
pub mod ops;
pub mod weights;
pub mod zoo;

pub use error::{Error, Result};
pub use hooks::{Hooks, LinearSite, ModelInfo, NoHooks, SiteInfo};
