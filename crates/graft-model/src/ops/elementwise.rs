//! Norms, rotary positions and element-wise activations.
use super::dispatch::{fused, input};
use super::{cpu, reference};
use candle_core::{Result, Tensor};

/// Layer normalisation over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, gamma, beta) = (&input(x), &input(gamma), &input(beta));
    if !fused(&[x, gamma, beta]) {
        return reference::layer_norm(x, gamma, beta, eps);
    }
    x.contiguous()?.apply_op3_arc(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        std::sync::Arc::new(Box::new(cpu::LayerNorm { eps, centred: true })),
    )
}

/// Root-mean-square normalisation over the last dimension, `x / √(mean(x²) + ε) ⊙ weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, weight) = (&input(x), &input(weight));
    if !fused(&[x, weight]) {
        return reference::rms_norm(x, weight, eps);
    }
    // The layer-norm kernel without centring, with a zero (untracked) beta.
    let weight = weight.contiguous()?;
    x.contiguous()?.apply_op3_arc(
        &weight,
        &weight.zeros_like()?,
        std::sync::Arc::new(Box::new(cpu::LayerNorm {
            eps,
            centred: false,
        })),
    )
}

/// Rotary position embedding of `x` `[batch, seq, heads, head_dim]`, turning the first
/// `2 * half` features of each head by the angles whose cosines and sines are `cos` and `sin`
/// (`[seq, half]`); the remaining features pass unchanged (ChatGLM rotates half of each head).
/// `interleaved` pairs features (0, 1), (2, 3), ... as ChatGLM and ggml do; otherwise (i, i +
/// half), transformers' rotate_half.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (x, cos, sin) = (&input(x), &input(cos), &input(sin));
    let (_, t, _, d) = x.dims4()?;
    let (ct, half) = cos.dims2()?;
    if ct != t || sin.dims() != cos.dims() || 2 * half > d {
        candle_core::bail!(
            "rope: x {:?} with cos {:?} and sin {:?} (expected [{t}, at most {}])",
            x.dims(),
            cos.dims(),
            sin.dims(),
            d / 2
        );
    }
    // The angles are constants of the fused kernel: with tracked angles, the composition.
    if cos.track_op() || sin.track_op() || !fused(&[x, cos, sin]) {
        return reference::rope(x, cos, sin, interleaved);
    }
    x.contiguous()?.apply_op1(cpu::Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        dims: x.dims4()?,
        interleaved,
    })
}

/// SiLU-gated product `silu(gate) ⊙ up` (Llama's and ChatGLM's SwiGLU feed-forward).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gate, up) = (&input(gate), &input(up));
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    if !fused(&[gate, up]) {
        return reference::swiglu(gate, up);
    }
    gate.contiguous()?.apply_op2_arc(
        &up.contiguous()?,
        std::sync::Arc::new(Box::new(cpu::Swiglu)),
    )
}

/// GELU, exact (erf) form: transformers' `"gelu"`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let x = &input(x);
    if !fused(&[x]) {
        return reference::gelu_erf(x);
    }
    x.contiguous()?.apply_op1(cpu::GeluErf)
}

/// `x ⊙ scale`, `scale` a vector over the last dimension of `x` (IA3's rescaling).
pub fn scale_last_dim(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (x, scale) = (&input(x), &input(scale));
    let n = x.dims().last().copied().unwrap_or(0);
    if scale.elem_count() != n {
        candle_core::bail!(
            "scale_last_dim: a scale of {} elements for a last dimension of {n}",
            scale.elem_count()
        );
    }
    if !fused(&[x, scale]) {
        return reference::scale_last_dim(x, scale);
    }
    x.contiguous()?.apply_op2_arc(
        &scale.flatten_all()?.contiguous()?,
        std::sync::Arc::new(Box::new(cpu::ScaleColumns)),
    )
}
