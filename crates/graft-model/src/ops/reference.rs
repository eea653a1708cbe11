//! The same operations composed from candle primitives, each of which has a backward: what
//! runs on devices the fused kernels do not cover (CUDA), and the oracle the kernels are tested
//! against.
//!
//! Mixed precision as autocast does it: products run in the activations' dtype, while norms,
//! softmax and their statistics run in f32 for half-precision (bf16, f16) activations, and a
//! tensor of another dtype (an f32 trainable one meeting bf16 activations) is cast, with a
//! backward, to the activations' dtype.
use super::types::{compute_dtype, AttentionSpec};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, D};

/// How [`with_constant`] combines a tensor with its constant.
#[derive(Debug, Clone, Copy)]
pub enum ConstantOp {
    Add,
    Sub,
    Mul,
}

/// `x + c`, `x - c` or `x ⊙ c` for a `c` that takes no gradient (a frozen norm weight, rotary
/// angles, the attention mask, a softmax's row maximum), broadcast to `x`'s shape: one node
/// whose backward returns `x`'s gradient alone. candle's broadcast ops give `c` a gradient too,
/// a zeroed buffer of `x`'s whole shape (and, for a product, the tensors it was made from) that
/// the GradStore keeps until the backward ends: on the composed path, three score-sized f32
/// buffers a layer.
pub fn with_constant(x: &Tensor, c: &Tensor, op: ConstantOp) -> Result<Tensor> {
    let c = c.detach().to_dtype(x.dtype())?.broadcast_as(x.shape())?;
    x.apply_op1_arc(std::sync::Arc::new(Box::new(Constant { c, op })))
}

/// See [`with_constant`]; `c` is already in `x`'s dtype and shape.
struct Constant {
    c: Tensor,
    op: ConstantOp,
}

impl Constant {
    /// The op on storages of one backend; `of` finds that backend's storage in a tensor.
    fn apply<S: BackendStorage>(
        &self,
        x: &S,
        layout: &Layout,
        of: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (c, c_layout) = self.c.storage_and_layout();
        let c = of(&c).ok_or_else(|| candle_core::Error::Msg("constant: two devices".into()))?;
        let out = match self.op {
            ConstantOp::Add => x.binary_impl::<candle_core::op::Add>(c, layout, c_layout)?,
            ConstantOp::Sub => x.binary_impl::<candle_core::op::Sub>(c, layout, c_layout)?,
            ConstantOp::Mul => x.binary_impl::<candle_core::op::Mul>(c, layout, c_layout)?,
        };
        Ok((out, layout.shape().clone()))
    }
}

impl CustomOp1 for Constant {
    fn name(&self) -> &'static str {
        "with-constant"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.apply(x, layout, super::types::cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.apply(x, layout, super::types::cuda_storage)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.op {
            ConstantOp::Add | ConstantOp::Sub => grad_res.clone(),
            ConstantOp::Mul => grad_res.mul(&self.c)?,
        }))
    }
}

/// `x ⊙ w` with `w` broadcast over the last dimension: a trainable `w` gets its gradient, a
/// frozen one is a constant (see [`with_constant`]).
fn times(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() {
        x.broadcast_mul(w)
    } else {
        with_constant(x, w, ConstantOp::Mul)
    }
}

/// `x + w`, as [`times`].
fn plus(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() {
        x.broadcast_add(w)
    } else {
        with_constant(x, w, ConstantOp::Add)
    }
}

/// Layer normalisation over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let wide = compute_dtype(x.dtype());
    let xw = x.to_dtype(wide)?;
    let mean = xw.mean_keepdim(D::Minus1)?;
    let centred = xw.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let out = plus(
        &times(&normed, &gamma.to_dtype(wide)?)?,
        &beta.to_dtype(wide)?,
    )?;
    out.to_dtype(x.dtype())
}

/// Softmax over the last dimension. The row maximum is subtracted for stability and
/// detached: softmax does not depend on it, so no gradient is lost.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let exp = with_constant(x, &max, ConstantOp::Sub)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// `x ⊙ scale` over the last dimension.
pub fn scale_last_dim(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&scale.flatten_all()?.to_dtype(x.dtype())?)
}

/// SiLU-gated product `silu(gate) ⊙ up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// GELU, exact (erf) form.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Scaled dot-product attention; see [`super::attention`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttentionSpec) -> Result<Tensor> {
    let (b, tq, width) = q.dims3()?;
    let tk = k.dim(1)?;
    let hd = width / spec.heads;
    let group = spec.heads / spec.kv_heads;
    let heads = |x: &Tensor, n: usize, t: usize| -> Result<Tensor> {
        x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
    };
    // Grouped-query attention: each key/value head serves `group` consecutive query heads.
    let repeat = |x: Tensor| -> Result<Tensor> {
        if group == 1 {
            return Ok(x);
        }
        x.unsqueeze(2)?
            .broadcast_as((b, spec.kv_heads, group, tk, hd))?
            .reshape((b, spec.heads, tk, hd))
    };
    let q = heads(q, spec.heads, tq)?;
    let k = repeat(heads(k, spec.kv_heads, tk)?)?;
    let v = repeat(heads(v, spec.kv_heads, tk)?)?;
    // Scores, bias and softmax in f32 for half-precision activations.
    let wide = compute_dtype(q.dtype());
    let mut scores = q
        .matmul(&k.t()?)?
        .to_dtype(wide)?
        .affine(1.0 / (hd as f64).sqrt(), 0.0)?;
    // The key bias and the causal mask as one additive bias `[b or 1, 1, tq or 1, tk]`
    // (-inf where a key is hidden: what masking to -inf gives), added in one node.
    let bias = spec
        .key_bias
        .map(|bias| bias.reshape((b, 1, 1, tk))?.to_dtype(wide))
        .transpose()?;
    let causal = if spec.causal {
        let visible = super::constants::causal_visibility(tq, tk, q.device())?;
        let zeros = Tensor::zeros((tq, tk), wide, q.device())?;
        let blocked = Tensor::full(f64::NEG_INFINITY, (), q.device())?
            .to_dtype(wide)?
            .broadcast_as((tq, tk))?;
        Some(
            visible
                .where_cond(&zeros, &blocked)?
                .reshape((1, 1, tq, tk))?,
        )
    } else {
        None
    };
    let bias = match (bias, causal) {
        (Some(bias), Some(causal)) if !bias.track_op() => Some(bias.broadcast_add(&causal)?),
        (Some(bias), Some(causal)) => {
            scores = scores.broadcast_add(&bias)?;
            Some(causal)
        }
        (bias, causal) => bias.or(causal),
    };
    if let Some(bias) = bias {
        scores = plus(&scores, &bias)?;
    }
    (softmax_last_dim(&scores)?)
        .to_dtype(v.dtype())?
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, tq, width))
}

/// `x · Wᵀ + b` with candle's own matmul, in `x`'s dtype: gradients reach `x`, `weight` and
/// `bias`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let weight = &weight.to_dtype(x.dtype())?;
    let bias = bias.map(|b| b.to_dtype(x.dtype())).transpose()?;
    let bias = bias.as_ref();
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

/// Root-mean-square normalisation over the last dimension (Llama's and ChatGLM's RMSNorm).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let wide = compute_dtype(x.dtype());
    let xw = x.to_dtype(wide)?;
    let mean_square = xw.sqr()?.mean_keepdim(D::Minus1)?;
    let out = xw.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    let out = times(&out, &weight.to_dtype(wide)?)?;
    out.to_dtype(x.dtype())
}

/// Rotary position embedding on the first `2 * cos.dim(1)` features of each head; see
/// [`super::rope`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (b, t, n, d) = x.dims4()?;
    let half = cos.dim(1)?;
    let rotated = 2 * half;
    let cos = cos.reshape((1, t, 1, half))?;
    let sin = sin.reshape((1, t, 1, half))?;
    let turn = |a: &Tensor, b: &Tensor| -> Result<(Tensor, Tensor)> {
        Ok((
            (times(a, &cos)? - times(b, &sin)?)?,
            (times(b, &cos)? + times(a, &sin)?)?,
        ))
    };
    let head = x.narrow(3, 0, rotated)?;
    let turned = if interleaved {
        // Pairs (0, 1), (2, 3), ...: ChatGLM's layout, and ggml's.
        let pairs = head.reshape((b, t, n, half, 2))?;
        let (even, odd) = turn(
            &pairs.narrow(4, 0, 1)?.squeeze(4)?,
            &pairs.narrow(4, 1, 1)?.squeeze(4)?,
        )?;
        Tensor::stack(&[even, odd], 4)?.reshape((b, t, n, rotated))?
    } else {
        // Pairs (i, i + half): transformers' rotate_half.
        let (first, second) = turn(&head.narrow(3, 0, half)?, &head.narrow(3, half, half)?)?;
        Tensor::cat(&[first, second], 3)?
    };
    if rotated == d {
        Ok(turned)
    } else {
        Tensor::cat(&[turned, x.narrow(3, rotated, d - rotated)?], 3)
    }
}
