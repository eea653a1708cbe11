//! BERT's blocks that end in a residual add and a layer norm.
use super::cpu;
use super::dispatch::{fused, input};
use super::elementwise::{gelu_erf, layer_norm};
use super::linear::linear;
use candle_core::{Result, Tensor};
use std::sync::OnceLock;

/// A projection added to a residual and normalised, `LN(residual + x · Wᵀ + bias)`: BERT's
/// attention output with its add & norm, and the end of its feed-forward block.
#[derive(Clone)]
pub struct ResidualNorm {
    /// `[hidden, width]`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// `[hidden]` each.
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f64,
}

impl ResidualNorm {
    fn tensors(&self) -> Vec<&Tensor> {
        let mut all = vec![&self.weight, &self.gamma, &self.beta];
        all.extend(self.bias.as_ref());
        all
    }

    /// The composition of [`linear`], the add and [`layer_norm`], one graph node each.
    fn composed(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let sum = (linear(x, &self.weight, self.bias.as_ref())? + residual)?;
        layer_norm(&sum, &self.gamma, &self.beta, self.eps)
    }

    /// The tensors as the fused kernels take them (contiguous), the norm's and the bias'
    /// sizes checked against the weight's rows. Returns the weight's input width too.
    fn kernel(&self) -> Result<(cpu::ResidualNorm, usize)> {
        let (hidden, width) = self.weight.dims2()?;
        let fits = [Some(&self.gamma), Some(&self.beta), self.bias.as_ref()]
            .iter()
            .flatten()
            .all(|t| t.dims() == [hidden]);
        if !fits {
            candle_core::bail!(
                "a norm of {:?} and a bias of {:?} do not fit a projection of {:?}",
                self.gamma.dims(),
                self.bias.as_ref().map(Tensor::dims),
                self.weight.dims()
            )
        }
        let kernel = cpu::ResidualNorm {
            weight: self.weight.contiguous()?,
            bias: self.bias.as_ref().map(Tensor::contiguous).transpose()?,
            norm: cpu::LayerNorm {
                eps: self.eps,
                centred: true,
            },
            gamma: self.gamma.contiguous()?,
            beta: self.beta.contiguous()?,
        };
        Ok((kernel, width))
    }
}

/// A feed-forward block with its residual and layer norm (BERT's intermediate, output and
/// output LayerNorm): `LN(x + GELU(x · W_inᵀ + b_in) · W_outᵀ + b_out)`.
#[derive(Clone)]
pub struct FeedForward {
    /// `[ffn, hidden]`.
    pub w_in: Tensor,
    pub b_in: Option<Tensor>,
    /// `W_out` `[hidden, ffn]`, `b_out` and the norm.
    pub out: ResidualNorm,
}

/// The feed-forward block. With frozen tensors on the CPU it is one node whose backward
/// computes only the input's gradient (see `cpu::FeedForwardBlock`); with a trained one (full
/// fine-tuning), or elsewhere, the composition of this module's ops, with the same values.
pub fn feed_forward_block(x: &Tensor, block: &FeedForward) -> Result<Tensor> {
    let x = &input(x);
    let mut frozen = block.out.tensors();
    frozen.push(&block.w_in);
    frozen.extend(block.b_in.as_ref());
    let mut all = frozen.clone();
    all.push(x);
    if frozen.iter().any(|t| t.track_op()) || !fused(&all) {
        let inner = gelu_erf(&linear(x, &block.w_in, block.b_in.as_ref())?)?;
        return block.out.composed(&inner, x);
    }
    let (out, ffn) = block.out.kernel()?;
    let hidden = block.out.weight.dim(0)?;
    let fits = block.w_in.dims() == [ffn, hidden]
        && block.b_in.as_ref().is_none_or(|b| b.dims() == [ffn])
        && x.dims().last() == Some(&hidden);
    if !fits {
        candle_core::bail!(
            "feed-forward block: input {:?} does not fit W_in {:?} and W_out {:?}",
            x.dims(),
            block.w_in.dims(),
            block.out.weight.dims()
        )
    }
    let op = cpu::FeedForwardBlock {
        w_in: block.w_in.contiguous()?,
        b_in: block.b_in.as_ref().map(Tensor::contiguous).transpose()?,
        out,
        keep: x.track_op(),
        kept: OnceLock::new(),
    };
    x.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(op)))
}

/// `LN(residual + x · Wᵀ + bias)` (BERT's attention output with its add & norm). With frozen
/// tensors on the CPU it is one node over `(x, residual)` (see `cpu::ProjectionNorm`);
/// otherwise the composition of [`linear`], the add and [`layer_norm`], with the same values.
pub fn projection_norm(x: &Tensor, residual: &Tensor, block: &ResidualNorm) -> Result<Tensor> {
    let (x, residual) = (&input(x), &input(residual));
    let mut all = block.tensors();
    all.extend([x, residual]);
    if block.tensors().iter().any(|t| t.track_op()) || !fused(&all) {
        return block.composed(x, residual);
    }
    let (kernel, width) = block.kernel()?;
    let hidden = block.weight.dim(0)?;
    let fits = x.dims().last() == Some(&width)
        && residual.dims().last() == Some(&hidden)
        && x.elem_count() / width == residual.elem_count() / hidden;
    if !fits {
        candle_core::bail!(
            "projection_norm: input {:?} and residual {:?} do not fit a weight of {:?}",
            x.dims(),
            residual.dims(),
            block.weight.dims()
        )
    }
    let op = cpu::ProjectionNorm {
        block: kernel,
        keep: x.track_op() || residual.track_op(),
        kept: OnceLock::new(),
    };
    x.contiguous()?
        .apply_op2_arc(&residual.contiguous()?, std::sync::Arc::new(Box::new(op)))
}
