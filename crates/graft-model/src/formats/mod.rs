//! One file per checkpoint format, each reading into [`crate::weights::Weights`]; `folder`
//! picks the format a model folder holds.
pub mod folder;
pub mod gguf;
pub mod pickle;
pub mod pytorch;
pub mod random;
pub mod safetensors;
