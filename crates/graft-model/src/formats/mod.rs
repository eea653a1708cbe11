//! One file per checkpoint format, each reading into [`crate::weights::Weights`]; `folder`
//! picks the format a model folder holds, and `gguf_export` writes a decoder as llama.cpp's
//! GGUF.
pub mod folder;
pub mod gguf;
pub mod gguf_export;
mod gguf_writer;
pub mod pickle;
pub mod pytorch;
pub mod random;
pub mod safetensors;
