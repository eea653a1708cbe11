//! What the fused kernels and the reference compositions share: attention's options and
//! the dtypes ops compute in.
use candle_core::{Result, Tensor};

/// What an attention call attends to.
pub struct AttentionSpec<'a> {
    pub heads: usize,
    /// Key/value heads; `heads` must be a multiple (grouped-query and multi-query attention).
    pub kv_heads: usize,
    /// Each query sees only keys up to its own position (offset by any extra leading keys).
    pub causal: bool,
    /// Additive bias per key, `[batch, keys]`: 0 where a key may be attended, a large negative
    /// number where it is padding (see [`additive_mask`]).
    pub key_bias: Option<&'a Tensor>,
}

/// Additive attention bias `[batch, keys]` from a 0/1 key mask `[batch, keys]`: 0 where a key
/// may be attended, a large negative number where it is padding. In f64 for an f64 model, else
/// in f32: attention scores are computed in f32 for half-precision models, and -1e9 is -inf in
/// f16.
pub fn additive_mask(mask: &Tensor, model_dtype: candle_core::DType) -> Result<Tensor> {
    use candle_core::DType;
    let dtype = match model_dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let mask = mask.to_dtype(DType::F32)?;
    ((mask - 1.0)? * 1e9)?.to_dtype(dtype)
}

/// The dtype norms, softmax and the loss compute in for tensors of `dtype`: f32 for half
/// precision (bf16, f16), else `dtype` itself.
pub fn compute_dtype(dtype: candle_core::DType) -> candle_core::DType {
    use candle_core::DType;
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// A second tensor's CPU storage, for a custom op whose CPU forward reads one beside its input.
pub(crate) fn cpu_storage(s: &candle_core::Storage) -> Option<&candle_core::CpuStorage> {
    match s {
        candle_core::Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

/// A second tensor's CUDA storage, as [`cpu_storage`] for a custom op's CUDA forward.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_storage(s: &candle_core::Storage) -> Option<&candle_core::CudaStorage> {
    match s {
        candle_core::Storage::Cuda(s) => Some(s),
        _ => None,
    }
}
