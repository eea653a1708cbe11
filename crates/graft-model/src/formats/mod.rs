//! One file per checkpoint format, each reading into [`crate::weights::Weights`]; `folder`
//! picks the format a model folder holds; `gguf_export` writes a decoder as llama.cpp's GGUF,
//! `gguf_lora` a low-rank adapter to one as llama.cpp's adapter GGUF.
pub mod folder;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_lora;
mod gguf_writer;
pub mod pickle;
pub mod pytorch;
pub mod random;
pub mod safetensors;
