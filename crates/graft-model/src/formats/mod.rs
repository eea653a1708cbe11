//! One file per checkpoint format, each reading into [`crate::weights::Weights`];
//! `gguf_export` writes a decoder as llama.cpp's GGUF.
pub mod gguf;
pub mod gguf_export;
pub mod random;
pub mod safetensors;
