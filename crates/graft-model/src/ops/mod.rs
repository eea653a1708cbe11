//! Training-safe building blocks.
//!
//! candle's fused `layer_norm`, `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` have no
//! backward and drop gradients silently, and its composed ops allocate a zeroed gradient and an
//! intermediate per graph edge. On the CPU (f32, f64) each function here runs a fused kernel with
//! a hand-written backward ([`cpu`]); elsewhere it runs the composition in [`reference`]. The
//! kernels are checked against the reference by value and by finite differences
//! (`tests/kernels.rs`). `GRAFT_REFERENCE_OPS=1` forces the reference everywhere, to measure
//! what the kernels gain.
mod attention;
mod blas;
mod blocks;
mod constants;
mod cpu;
mod dispatch;
mod elementwise;
mod float;
mod linear;
mod math;
mod matmul;
pub(crate) mod parallel;
pub mod reference;
mod simd;
mod types;

pub use attention::{attention, attention_packed};
pub use blas::OPENBLAS_WHEEL;
pub use blocks::{feed_forward_block, projection_norm, FeedForward, ResidualNorm};
pub use constants::{arange, causal_visibility};
pub use dispatch::{
    blas_core_for_this_cpu, blas_notice, fetch_blas, grad_enabled, matmul_path, reference_forced,
    without_grad,
};
pub use elementwise::{gelu_erf, layer_norm, rms_norm, rope, scale_last_dim, swiglu};
pub use linear::{
    linear, linear_low_rank, linear_low_ranks, low_rank_delta, quantized_linear,
    quantized_linear_low_rank,
};
pub use types::{additive_mask, compute_dtype, AttentionSpec};
