//! BERT's two blocks that end in a residual add and a layer norm, each one graph node.
use super::data::*;
use super::elementwise::GeluErf;
use super::linear::Linear;
use super::norm::LayerNorm;
use crate::ops::float::Float;
use crate::ops::matmul::{gemm, Threads, View};
use crate::ops::parallel::{self, SharedMut};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// BERT's two blocks that end in a residual add and a layer norm, each one graph node for frozen
// tensors: the attention output `y = LN(r + x · Wᵀ + b)` over (x, r), and the feed-forward
// block `y = LN(x + GELU(x · W1ᵀ + b1) · W2ᵀ + b2)` over x. Composed, each of their candle
// nodes costs the backward a zeroed gradient and an add (the feed-forward block's two over the
// wide `[tokens, ffn]` activations); here each input receives one gradient.

/// The frozen tensors of a projection added to a residual and normalised, contiguous:
/// `weight` `[hidden, width]`, `bias`, `gamma` and `beta` `[hidden]`.
pub(crate) struct ResidualNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub norm: LayerNorm,
    pub gamma: Tensor,
    pub beta: Tensor,
}

impl ResidualNorm {
    fn width(&self) -> Result<usize> {
        Ok(self.weight.dims2()?.1)
    }

    /// `(a · Wᵀ + bias) + residual` `[rows, hidden]` for `a` `[rows, width]`, summed in the
    /// order of the composition (`ops::linear`, then the add), so that the fused blocks and the
    /// composed ones give bit-identical outputs.
    fn sum<T: Float>(&self, a: &[T], residual: &[T]) -> Result<Vec<T>> {
        let width = self.width()?;
        let mut sum = with_data::<T, _>(&self.weight, |w| {
            with_optional::<T, _>(self.bias.as_ref(), |bias| {
                Ok(Linear::fwd(a, w, bias, w.len() / width))
            })
        })?;
        let shared = SharedMut::new(&mut sum);
        parallel::for_ranges(residual.len(), 16384, |range| {
            // SAFETY: the ranges are disjoint and inside the buffer.
            let part = unsafe { shared.slice(range.clone()) };
            for (s, &r) in part.iter_mut().zip(&residual[range]) {
                *s += r;
            }
        });
        Ok(sum)
    }

    fn normalise<T: Float>(&self, sum: &[T]) -> Result<Vec<T>> {
        with_data::<T, _>(&self.gamma, |g| {
            with_data::<T, _>(&self.beta, |b| Ok(self.norm.fwd(sum, g, b)))
        })
    }

    /// The gradient of the pre-norm sum, which the residual receives as it is.
    fn d_sum<T: Float>(&self, sum: &[T], dy: &[T]) -> Result<Vec<T>> {
        with_data::<T, _>(&self.gamma, |g| Ok(self.norm.bwd(sum, g, dy).0))
    }

    /// `d_sum · W`, the gradient of the projection's input `[rows, width]`.
    fn d_input<T: Float>(&self, d_sum: &[T]) -> Result<Vec<T>> {
        let width = self.width()?;
        with_data::<T, _>(&self.weight, |w| {
            let hidden = w.len() / width;
            Ok(product(
                (d_sum.len() / hidden, width, hidden),
                View::rows(d_sum.as_ptr(), hidden),
                View::rows(w.as_ptr(), width),
            ))
        })
    }
}

/// A vector kept for the backward, as a tensor (the ops are not generic over the element type).
fn kept_tensor<T: Float>(data: Vec<T>) -> Result<Tensor> {
    let n = data.len();
    Tensor::from_vec(data, n, &candle_core::Device::Cpu)
}

pub(crate) struct ProjectionNorm {
    pub block: ResidualNorm,
    /// Keep the pre-norm sum for the backward (when a gradient will be asked for), else the
    /// backward recomputes it.
    pub keep: bool,
    pub kept: OnceLock<Tensor>,
}

impl ProjectionNorm {
    fn fwd<T: Float>(&self, x: &[T], residual: &[T]) -> Result<Vec<T>> {
        let sum = self.block.sum(x, residual)?;
        let y = self.block.normalise(&sum)?;
        if self.keep {
            let _ = self.kept.set(kept_tensor(sum)?);
        }
        Ok(y)
    }

    /// `(dx, dr)`: the norm's input gradient through the projection, and as it is.
    fn bwd_typed<T: Float>(
        &self,
        x: &Tensor,
        residual: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let sum = match self.kept.get() {
            Some(kept) => kept.clone(),
            None => kept_tensor(with_data::<T, _>(x, |xs| {
                with_data::<T, _>(residual, |rs| self.block.sum(xs, rs))
            })?)?,
        };
        let d_sum = with_data::<T, _>(&grad, |dy| {
            with_data::<T, _>(&sum, |s| self.block.d_sum(s, dy))
        })?;
        let dx = x
            .track_op()
            .then(|| tensor(self.block.d_input(&d_sum)?, x))
            .transpose()?;
        Ok((dx, gradient(d_sum, residual)?))
    }
}

impl CustomOp2 for ProjectionNorm {
    fn name(&self) -> &'static str {
        "graft-projection-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(s1, "graft-projection-norm", T => T::to_cpu_storage_owned(
            self.fwd::<T>(&contiguous(s1, l1)?, &contiguous(s2, l2)?)?
        ));
        Ok((out, l2.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        for_dtype!(x.dtype(), T => self.bwd_typed::<T>(x, residual, grad))
    }
}

pub(crate) struct FeedForwardBlock {
    /// `[ffn, hidden]` and `[ffn]`, frozen and contiguous.
    pub w_in: Tensor,
    pub b_in: Option<Tensor>,
    /// The output projection `[hidden, ffn]`, its residual (the block's input) and norm.
    pub out: ResidualNorm,
    /// Keep the pre-activation and the pre-norm sum for the backward (when a gradient will
    /// be asked for), else the backward recomputes them.
    pub keep: bool,
    pub kept: OnceLock<(Tensor, Tensor)>,
}

impl FeedForwardBlock {
    /// `(pre-activation [rows, ffn], pre-norm sum [rows, hidden])` of input `x`.
    fn pre_norm<T: Float>(&self, x: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        let ffn = self.w_in.dims2()?.0;
        let inner = with_data::<T, _>(&self.w_in, |w_in| {
            with_optional::<T, _>(self.b_in.as_ref(), |b_in| {
                Ok(Linear::fwd(x, w_in, b_in, ffn))
            })
        })?;
        let sum = self.out.sum(&GeluErf::fwd(&inner), x)?;
        Ok((inner, sum))
    }

    fn fwd<T: Float>(&self, x: &[T]) -> Result<Vec<T>> {
        let (inner, sum) = self.pre_norm(x)?;
        let y = self.out.normalise(&sum)?;
        if self.keep {
            let _ = self.kept.set((kept_tensor(inner)?, kept_tensor(sum)?));
        }
        Ok(y)
    }

    fn bwd_typed<T: Float>(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let grad = grad.contiguous()?;
        let (ffn, hidden) = self.w_in.dims2()?;
        let recomputed;
        let (inner, sum) = match self.kept.get() {
            Some(kept) => kept,
            None => {
                let (inner, sum) = with_data::<T, _>(x, |xs| self.pre_norm(xs))?;
                recomputed = (kept_tensor(inner)?, kept_tensor(sum)?);
                &recomputed
            }
        };
        // The residual passes the pre-norm sum's gradient to x as it is; the product through
        // the activation is added onto it.
        let mut dx = with_data::<T, _>(&grad, |dy| {
            with_data::<T, _>(sum, |s| self.out.d_sum(s, dy))
        })?;
        let d_inner = with_data::<T, _>(inner, |inner| {
            Ok(GeluErf::bwd(inner, &self.out.d_input(&dx)?))
        })?;
        with_data::<T, _>(&self.w_in, |w_in| {
            // SAFETY: dx holds rows x hidden elements, written by nobody else.
            unsafe {
                gemm(
                    (dx.len() / hidden, hidden, ffn),
                    dx.as_mut_ptr(),
                    hidden,
                    true,
                    View::rows(d_inner.as_ptr(), ffn),
                    View::rows(w_in.as_ptr(), hidden),
                    T::one(),
                    Threads::Pool,
                )
            };
            Ok(())
        })?;
        tensor(dx, x)
    }
}

impl CustomOp1 for FeedForwardBlock {
    fn name(&self) -> &'static str {
        "graft-feed-forward-block"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(s1, "graft-feed-forward-block", T => T::to_cpu_storage_owned(
            self.fwd::<T>(&contiguous(s1, l1)?)?
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            for_dtype!(x.dtype(), T => self.bwd_typed::<T>(x, grad)?),
        ))
    }
}
