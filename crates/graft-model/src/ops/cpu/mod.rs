//! Fused CPU kernels with hand-written backward passes, for f32 and f64.
//!
//! Half-precision tensors (bf16, f16) are storage only: a kernel reads them widened to f32,
//! computes in f32 and writes its output (and each gradient) narrowed back to the dtype of the
//! tensor it belongs to. So a bf16 model keeps half the bytes in weights and kept activations
//! while norms, softmax and products run in f32 (as autocast does), and f32 tensors (a
//! method's trainable ones) may meet bf16 ones in one kernel.
//!
//! Each replaces a chain of candle ops whose backward allocates a zeroed gradient and an
//! intermediate per edge. Every kernel is checked against its composed counterpart in
//! [`super::reference`] by value and by finite differences (`tests/kernels.rs`).
mod attention;
mod blocks;
mod data;
mod elementwise;
mod linear;
mod low_rank;
mod norm;
mod quantized;

pub(crate) use attention::{Attention, AttentionDims};
pub(crate) use blocks::{FeedForwardBlock, ProjectionNorm, ResidualNorm};
pub(crate) use data::supports;
pub(crate) use elementwise::{GeluErf, Rope, ScaleColumns, Swiglu};
pub(crate) use linear::{FrozenWeight, Linear};
pub(crate) use low_rank::{LowRankLinear, UpdateBlock};
pub(crate) use norm::LayerNorm;
pub(crate) use quantized::QuantizedLinear;
