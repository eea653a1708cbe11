//! One file per architecture: its `Config` as config.json holds it, and how its checkpoint maps
//! onto graft's graphs (BERT has its own encoder; the decoders plan `crate::decoder`).
pub mod bert;
pub mod chatglm;
pub mod llama;
