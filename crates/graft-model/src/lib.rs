//! graft-model: transformer architectures written against PEFT injection hooks, weight loading,
//! and ops whose every step has a backward.
pub mod bert;
pub mod chatglm;
pub mod classify;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hooks;
pub mod init;
pub mod layers;
pub mod llama;
pub mod ops;
pub mod quant;
pub mod runtime;
pub mod weights;
pub mod zoo;

pub use error::{Error, Result};
pub use hooks::{Acts, Hooks, LinearSite, LowRank, ModelInfo, NoHooks, SiteInfo};

/// The device graft computes on: the first CUDA GPU when built with `--features cuda`.
pub fn default_device() -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        Ok(candle_core::Device::new_cuda(0)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(candle_core::Device::Cpu)
    }
}

/// Mean cross-entropy of `logits` `[batch, classes]` against class ids `labels` `[batch]`,
/// from ops that all have a backward (log-softmax with a detached maximum).
pub fn cross_entropy(
    logits: &candle_core::Tensor,
    labels: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    use candle_core::D;
    // In f32 for half-precision logits: a 49k-way log-sum-exp in bf16 loses the loss.
    let logits = &logits.to_dtype(ops::compute_dtype(logits.dtype()))?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}
