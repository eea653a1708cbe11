//! Training-safe building blocks.
//!
//! candle's fused `layer_norm`, `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` have no
//! backward and drop gradients silently, so training graphs are built from ops that have one.
//! Each function here is checked against finite differences in `tests/gradients.rs`.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, D};

/// Layer normalisation over the last dimension, from primitive ops.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(gamma)?.broadcast_add(beta)
}

/// Softmax over the last dimension, from primitive ops. The row maximum is subtracted for
/// stability and detached: softmax does not depend on it, so no gradient is lost.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// `x · Wᵀ + b` for a frozen `weight` (`[out, in]`).
///
/// candle's matmul backward always computes the weight gradient, which for a frozen weight is
/// wasted work (about a third of a LoRA step) and a model-sized set of buffers. Here the
/// product is computed outside the graph and a custom op carries only `dL/dx = dL/dy · W`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let output = plain_linear(&x.detach(), weight, bias)?;
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(FrozenLinearGrad {
        weight: weight.clone(),
        output,
    })
}

/// `x · Wᵀ + b` with candle's own matmul: gradients reach `x`, `weight` and `bias`.
pub fn plain_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let out = match x.dims() {
        [b, s, i] => x
            .reshape((b * s, *i))?
            .matmul(&weight.t()?)?
            .reshape((*b, *s, ()))?,
        _ => x.broadcast_matmul(&weight.t()?)?,
    };
    match bias {
        Some(bias) => out.broadcast_add(bias),
        None => Ok(out),
    }
}

struct FrozenLinearGrad {
    weight: Tensor,
    output: Tensor,
}

impl CustomOp1 for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _input: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.output.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) if layout.is_contiguous() && layout.start_offset() == 0 => {
                Ok((cpu.clone(), layout.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: output is not a contiguous CPU tensor"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _input: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (storage, layout) = self.output.storage_and_layout();
        match &*storage {
            Storage::Cuda(cuda) => Ok((cuda.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("frozen-linear: output is not a CUDA tensor"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad_x = match grad_res.dims() {
            [b, s, o] => grad_res
                .reshape((b * s, *o))?
                .matmul(&self.weight)?
                .reshape((*b, *s, ()))?,
            _ => grad_res.broadcast_matmul(&self.weight)?,
        };
        Ok(Some(grad_x))
    }
}

/// Additive attention bias `[batch, 1, 1, keys]` from a 0/1 key mask `[batch, keys]`: 0 where a
/// key may be attended, a large negative number where it is padding.
pub fn additive_mask(mask: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let (b, k) = mask.dims2()?;
    let mask = mask.to_dtype(candle_core::DType::F32)?;
    let bias = ((mask - 1.0)? * 1e9)?;
    bias.reshape((b, 1, 1, k))?.to_dtype(dtype)
}
