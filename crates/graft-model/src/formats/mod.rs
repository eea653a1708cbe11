//! One file per checkpoint format, each reading into [`crate::weights::Weights`].
pub mod gguf;
pub mod random;
pub mod safetensors;
