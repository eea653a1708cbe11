//! Training-safe building blocks.
//!
//! candle's fused `layer_norm`, `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` have no
//! backward and drop gradients silently, and its composed ops allocate a zeroed gradient and an
//! intermediate per graph edge. On the CPU (f32, f64) each function here runs a fused kernel with
//! a hand-written backward ([`cpu`]); elsewhere it runs the composition in [`reference`]. The
//! kernels are checked against the reference by value and by finite differences
//! (`tests/kernels.rs`). `GRAFT_REFERENCE_OPS=1` forces the reference everywhere, to measure
//! what the kernels gain.
mod blas;
mod cpu;
mod math;
mod matmul;
mod parallel;
pub mod reference;
mod simd;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use std::sync::OnceLock;

/// The OpenBLAS kernel family for this CPU (see [`crate::runtime::init`]).
pub fn blas_core_for_this_cpu() -> Option<&'static str> {
    blas::core_for_this_cpu()
}

/// What the large CPU products run on, for reports and `eval.json`'s `matmul`: "OpenBLAS
/// 0.3.34 (graft's copy, Haswell kernels)", or "gemm crate".
pub fn matmul_path() -> String {
    blas::get().map_or("gemm crate".into(), |b| b.describe())
}

/// When the large CPU products do not run on OpenBLAS: a line saying why, and how to get it
/// (`GRAFT_BLAS` names another library or chooses the gemm crate).
pub fn blas_notice() -> Option<String> {
    blas::notice()
}

pub use blas::OPENBLAS_WHEEL;

/// graft's own copy of OpenBLAS in its cache, fetched first if it is not there (`graft
/// fetch-blas`): the file's path.
pub fn fetch_blas() -> crate::Result<std::path::PathBuf> {
    let dir = blas::copy_dir();
    blas::OPENBLAS_WHEEL.fetch(&dir)?;
    Ok(dir.join(blas::OPENBLAS_WHEEL.files[0]))
}

thread_local! {
    static GRAD_ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with gradients off on this thread: every op here then takes its inputs detached,
/// so a forward pass records no graph (nothing kept for a backward that will not come, however
/// the method's tensors are tracked). For evaluation, prediction and generation.
pub fn without_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(false)));
    f()
}

/// Whether ops on this thread record gradients (see [`without_grad`]).
pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// `t`, detached when gradients are off.
fn input(t: &Tensor) -> Tensor {
    if grad_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

/// Whether the fused CPU kernels may run on these tensors.
fn fused(tensors: &[&Tensor]) -> bool {
    !reference_forced() && cpu::supports(tensors)
}

/// Whether `GRAFT_REFERENCE_OPS` forces the composed reference ops everywhere; read once, when
/// the first op runs (a test that sets it checks here that it was in time).
pub fn reference_forced() -> bool {
    static FORCE_REFERENCE: OnceLock<bool> = OnceLock::new();
    *FORCE_REFERENCE.get_or_init(|| {
        std::env::var("GRAFT_REFERENCE_OPS").is_ok_and(|v| v != "0" && !v.is_empty())
    })
}

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

/// Probabilities larger than this are recomputed in the backward pass rather than kept.
const KEEP_PROBS_BYTES: usize = 256 << 20;

/// Scaled dot-product attention, softmax(q·kᵀ/√d + bias)·v, on `[batch, seq, heads * d]`
/// activations: `q` `[b, tq, heads * d]`, `k` and `v` `[b, tk, kv_heads * d]` with `tk >= tq`
/// when causal. Returns `[b, tq, heads * d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttentionSpec) -> Result<Tensor> {
    let (q, k, v) = (&input(q), &input(k), &input(v));
    let key_bias = spec.key_bias.map(input);
    let spec = &AttentionSpec {
        key_bias: key_bias.as_ref(),
        ..*spec
    };
    attention_keeping(q, k, v, spec, KEEP_PROBS_BYTES)
}

fn attention_keeping(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttentionSpec,
    keep_limit: usize,
) -> Result<Tensor> {
    let (batch, queries, width) = q.dims3()?;
    let (_, keys, kv_width) = k.dims3()?;
    if spec.heads == 0
        || spec.kv_heads == 0
        || !spec.heads.is_multiple_of(spec.kv_heads)
        || !width.is_multiple_of(spec.heads)
        || kv_width != width / spec.heads * spec.kv_heads
        || v.dims() != k.dims()
        || k.dim(0)? != batch
        || (spec.causal && keys < queries)
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {} heads over {} key/value heads{}",
            q.dims(),
            k.dims(),
            v.dims(),
            spec.heads,
            spec.kv_heads,
            if spec.causal { " (causal)" } else { "" }
        );
    }
    let mut all = vec![q, k, v];
    all.extend(spec.key_bias);
    if !fused(&all) {
        return reference::attention(q, k, v, spec);
    }
    let head_dim = width / spec.heads;
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let keep = tracked.then_some(keep_limit / q.dtype().size_in_bytes());
    let op = attention_op(
        spec,
        (batch, queries, keys, head_dim),
        (width, kv_width),
        keep,
        q.dtype(),
    )?;
    q.contiguous()?.apply_op3_arc(
        &k.contiguous()?,
        &v.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// The fused kernel for `spec` at these sizes, its inputs' rows `strides` (query, key/value)
/// apart. When a backward will follow, `keep` says how many probabilities it may keep.
fn attention_op(
    spec: &AttentionSpec,
    (batch, queries, keys, head_dim): (usize, usize, usize, usize),
    (q_stride, kv_stride): (usize, usize),
    keep: Option<usize>,
    kept_dtype: candle_core::DType,
) -> Result<cpu::Attention> {
    // Probabilities are kept for the backward when one will follow and they fit the limit;
    // else (long sequences) the backward recomputes them.
    let probs = batch * spec.heads * queries * keys;
    Ok(cpu::Attention {
        keep_probs: keep.is_some_and(|limit| probs <= limit),
        kept: Default::default(),
        kept_dtype,
        dims: cpu::AttentionDims {
            batch,
            queries,
            keys,
            heads: spec.heads,
            kv_heads: spec.kv_heads,
            head_dim,
            causal: spec.causal,
            scale: 1.0 / (head_dim as f64).sqrt(),
            q_stride,
            kv_stride,
        },
        key_bias: spec
            .key_bias
            .map(|b| b.reshape((batch, keys))?.contiguous())
            .transpose()?,
    })
}

/// As [`attention`], with q, k and v the column blocks `[q | k | v]` of one `[batch, seq,
/// (heads + 2 kv_heads) · d]` tensor (query, key and value projected as one product): one
/// graph node, and one gradient for the three.
pub fn attention_packed(qkv: &Tensor, spec: &AttentionSpec) -> Result<Tensor> {
    let qkv = &input(qkv);
    let key_bias = spec.key_bias.map(input);
    let spec = &AttentionSpec {
        key_bias: key_bias.as_ref(),
        ..*spec
    };
    let (batch, seq, width) = qkv.dims3()?;
    let parts = spec.heads + 2 * spec.kv_heads;
    if spec.heads == 0
        || spec.kv_heads == 0
        || !spec.heads.is_multiple_of(spec.kv_heads)
        || !width.is_multiple_of(parts)
    {
        candle_core::bail!(
            "attention: packed q, k, v of {:?} do not fit {} heads over {} key/value heads",
            qkv.dims(),
            spec.heads,
            spec.kv_heads
        );
    }
    let head_dim = width / parts;
    let (q_width, kv_width) = (spec.heads * head_dim, spec.kv_heads * head_dim);
    let mut all = vec![qkv];
    all.extend(spec.key_bias);
    if !fused(&all) {
        let q = qkv.narrow(2, 0, q_width)?;
        let k = qkv.narrow(2, q_width, kv_width)?;
        let v = qkv.narrow(2, q_width + kv_width, kv_width)?;
        return reference::attention(&q, &k, &v, spec);
    }
    let sizes = (batch, seq, seq, head_dim);
    let keep = qkv
        .track_op()
        .then_some(KEEP_PROBS_BYTES / qkv.dtype().size_in_bytes());
    let op = attention_op(spec, sizes, (width, width), keep, qkv.dtype())?;
    qkv.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(op)))
}

/// `x · Wᵀ + b` (`weight` `[out, in]`, `x` `[..., in]`). Gradients reach whichever of `x`,
/// `weight` and `bias` are tracked, and only those are computed: a frozen weight costs no
/// weight gradient, where candle's matmul backward always computes one (about a third of a LoRA
/// step, and a model-sized set of buffers).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (x, weight) = (&input(x), &input(weight));
    let bias = bias.map(input);
    let bias = bias.as_ref();
    let mut all = vec![x, weight];
    all.extend(bias);
    if fused(&all) {
        let x = x.contiguous()?;
        let weight = weight.contiguous()?;
        return match bias {
            Some(b) => x.apply_op3_arc(
                &weight,
                &b.contiguous()?,
                std::sync::Arc::new(Box::new(cpu::Linear)),
            ),
            None => x.apply_op2_arc(&weight, std::sync::Arc::new(Box::new(cpu::Linear))),
        };
    }
    if weight.track_op() || bias.is_some_and(Tensor::track_op) {
        return reference::linear(x, weight, bias);
    }
    let output = reference::linear(&x.detach(), weight, bias)?;
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(FrozenLinearGrad {
        weight: FrozenWeight::Dense(weight.clone()),
        output,
    })
}

/// `x · Wᵀ` through a frozen weight kept quantized (`x` `[..., in]`, W `[out, in]`), with the
/// input gradient `dy · W`. On the CPU one fused node dequantizes W a block of rows at a time,
/// forward and backward, and computes in the activations' precision; elsewhere (and under
/// `GRAFT_REFERENCE_OPS`) candle's quantized product runs forward, which quantizes the
/// activations too on the CPU, and the backward multiplies by the dequantized weight.
pub fn quantized_linear(x: &Tensor, weight: &crate::quant::QuantizedWeight) -> Result<Tensor> {
    let x = &input(x);
    let (out_f, in_f) = weight.dims();
    if x.dims().last() != Some(&in_f) {
        candle_core::bail!(
            "quantized linear: input {:?} does not fit a weight of [{out_f}, {in_f}]",
            x.dims()
        );
    }
    if fused(&[x]) && weight.device().is_cpu() {
        let op = cpu::QuantizedLinear {
            weight: weight.clone(),
            transposed: false,
        };
        return x
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(op)));
    }
    // candle's quantized product takes f32, f16 and bf16; an f64 check runs it in f32.
    let detached = match x.dtype() {
        candle_core::DType::F64 => x.detach().to_dtype(candle_core::DType::F32)?,
        _ => x.detach(),
    };
    let product = candle_core::quantized::QMatMul::from_arc(weight.blocks().clone())?;
    let output = candle_core::Module::forward(&product, &detached.contiguous()?)?
        .to_dtype(x.dtype())?
        .contiguous()?;
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(FrozenLinearGrad {
        weight: FrozenWeight::Quantized(weight.clone()),
        output,
    })
}

/// `x · Wᵀ + bias` through a frozen quantized weight plus a low-rank update `(x ⊙ mask) · aᵀ ·
/// bᵀ` (LoRA on a quantized base, as QLoRA trains). On the CPU, with a frozen bias, one fused
/// node: the update is accumulated into the product and the input's gradient passes through
/// the dequantizing kernel, and the graph keeps neither the product nor the update apart.
/// Elsewhere the sum of [`quantized_linear`], the bias and [`low_rank_delta`].
pub fn quantized_linear_low_rank(
    x: &Tensor,
    weight: &crate::quant::QuantizedWeight,
    bias: Option<&Tensor>,
    update: &crate::LowRank,
) -> Result<Tensor> {
    let (out_f, in_f) = weight.dims();
    let (rank, in_a) = update.a.dims2()?;
    if in_a != in_f || update.b.dims() != [out_f, rank] {
        candle_core::bail!(
            "low-rank update of shapes a {:?}, b {:?} does not fit a weight of [{out_f}, {in_f}]",
            update.a.dims(),
            update.b.dims()
        )
    }
    let x = &input(x);
    let bias = bias.map(input);
    let (a, b) = (input(&update.a), input(&update.b));
    let mask = update.input_mask.as_ref().map(input);
    let mut all = vec![x, &a, &b];
    all.extend(bias.as_ref());
    all.extend(mask.as_ref());
    let fits = mask.as_ref().is_none_or(|m| m.dims() == x.dims())
        && !bias.as_ref().is_some_and(Tensor::track_op);
    if !(fits && fused(&all) && weight.device().is_cpu()) {
        let product = quantized_linear(x, weight)?;
        let base = match &bias {
            Some(b) => product.broadcast_add(b)?,
            None => product,
        };
        return base + low_rank_delta(x, update)?;
    }
    let op = cpu::LowRankLinear {
        weight: cpu::FrozenWeight::Quantized(weight.clone()),
        bias: bias.as_ref().map(Tensor::contiguous).transpose()?,
        mask: mask.as_ref().map(Tensor::contiguous).transpose()?,
        blocks: vec![cpu::UpdateBlock {
            columns: 0..out_f,
            ranks: 0..rank,
            b_offset: 0,
        }],
    };
    x.contiguous()?.apply_op3_arc(
        &a.contiguous()?,
        &b.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// `x · Wᵀ + bias` plus a low-rank update `(x ⊙ mask) · aᵀ · bᵀ` (LoRA, AdaLoRA). With a
/// frozen weight and bias on the CPU this is one fused node (see `cpu::LowRankLinear`);
/// otherwise the sum of [`linear`] and [`low_rank_delta`].
pub fn linear_low_rank(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    update: &crate::LowRank,
) -> Result<Tensor> {
    let out = weight.dims2()?.0;
    linear_low_ranks(x, weight, bias, &[(0..out, update)])
}

/// `x · Wᵀ + bias` with low-rank updates of blocks of its output columns: `(columns, update)`
/// adds `(x ⊙ mask) · aᵀ · bᵀ` to those columns (query, key and value projected as one
/// product, each with its own update). One fused node when the weight and bias are frozen, on
/// the CPU, and at most a single update has a dropout mask; else the composition.
pub fn linear_low_ranks(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    updates: &[(std::ops::Range<usize>, &crate::LowRank)],
) -> Result<Tensor> {
    let (out_w, in_w) = weight.dims2()?;
    for (columns, update) in updates {
        let (rank, in_a) = update.a.dims2()?;
        let (out_b, rank_b) = update.b.dims2()?;
        if in_a != in_w || out_b != columns.len() || columns.end > out_w || rank_b != rank {
            candle_core::bail!(
                "low-rank update of shapes a {:?}, b {:?} does not fit columns {columns:?} of a weight of {:?}",
                update.a.dims(),
                update.b.dims(),
                weight.dims()
            )
        }
    }
    let mut columns: Vec<_> = updates.iter().map(|(c, _)| c.clone()).collect();
    columns.sort_by_key(|c| c.start);
    if columns.windows(2).any(|w| w[0].end > w[1].start) {
        candle_core::bail!("low-rank updates of overlapping columns {columns:?}")
    }
    let (x, weight) = (&input(x), &input(weight));
    let bias = bias.map(input);
    let parts: Vec<(Tensor, Tensor, Option<Tensor>)> = updates
        .iter()
        .map(|(_, u)| (input(&u.a), input(&u.b), u.input_mask.as_ref().map(input)))
        .collect();
    let masks: Vec<&Tensor> = parts.iter().filter_map(|(_, _, m)| m.as_ref()).collect();
    let mut all = vec![x, weight];
    all.extend(bias.as_ref());
    all.extend(parts.iter().flat_map(|(a, b, _)| [a, b]));
    all.extend(masks.iter().copied());
    let frozen = !weight.track_op() && !bias.as_ref().is_some_and(Tensor::track_op);
    let masks_fit = match masks.as_slice() {
        [] => true,
        [mask] => updates.len() == 1 && mask.dims() == x.dims(),
        _ => false,
    };
    if updates.is_empty() || !(fused(&all) && frozen && masks_fit) {
        let base = linear(x, weight, bias.as_ref())?;
        return add_low_ranks(x, base, updates);
    }
    // A single update passes its own factors; several are stacked (A by rows, B flattened).
    let (a, b) = match parts.as_slice() {
        [(a, b, _)] => (a.contiguous()?, b.contiguous()?),
        _ => (
            Tensor::cat(&parts.iter().map(|(a, _, _)| a).collect::<Vec<_>>(), 0)?,
            Tensor::cat(
                &parts
                    .iter()
                    .map(|(_, b, _)| b.flatten_all())
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?,
        ),
    };
    let mut blocks = Vec::with_capacity(updates.len());
    let (mut rank, mut b_offset) = (0, 0);
    for (columns, update) in updates {
        let r = update.a.dims()[0];
        blocks.push(cpu::UpdateBlock {
            columns: columns.clone(),
            ranks: rank..rank + r,
            b_offset,
        });
        rank += r;
        b_offset += columns.len() * r;
    }
    let op = cpu::LowRankLinear {
        weight: cpu::FrozenWeight::Dense(weight.contiguous()?),
        bias: bias.as_ref().map(Tensor::contiguous).transpose()?,
        mask: masks.first().map(|m| m.contiguous()).transpose()?,
        blocks,
    };
    x.contiguous()?
        .apply_op3_arc(&a, &b, std::sync::Arc::new(Box::new(op)))
}

/// `base` with each update's delta added to its columns, composed of candle ops.
fn add_low_ranks(
    x: &Tensor,
    base: Tensor,
    updates: &[(std::ops::Range<usize>, &crate::LowRank)],
) -> Result<Tensor> {
    let out = base.dims().last().copied().unwrap_or(0);
    match updates {
        [] => Ok(base),
        [(columns, update)] if *columns == (0..out) => base + low_rank_delta(x, update)?,
        _ => {
            let last = base.rank() - 1;
            let mut pieces = Vec::new();
            let mut at = 0;
            let mut sorted: Vec<_> = updates.iter().collect();
            sorted.sort_by_key(|(columns, _)| columns.start);
            for (columns, update) in sorted {
                if columns.start > at {
                    pieces.push(base.narrow(last, at, columns.start - at)?);
                }
                let part = base.narrow(last, columns.start, columns.len())?;
                pieces.push((part + low_rank_delta(x, update)?)?);
                at = columns.end;
            }
            if at < out {
                pieces.push(base.narrow(last, at, out - at)?);
            }
            Tensor::cat(&pieces, last)
        }
    }
}

/// The low-rank update alone, `(x ⊙ mask) · aᵀ · bᵀ`.
pub fn low_rank_delta(x: &Tensor, update: &crate::LowRank) -> Result<Tensor> {
    let x = match &update.input_mask {
        Some(mask) => x.broadcast_mul(mask)?,
        None => x.clone(),
    };
    linear(&linear(&x, &update.a, None)?, &update.b, None)
}

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

/// The frozen projection off the CPU: the product is computed outside the graph and this op
/// carries only the input gradient.
struct FrozenLinearGrad {
    weight: FrozenWeight,
    output: Tensor,
}

enum FrozenWeight {
    Dense(Tensor),
    /// Dequantized whole for each backward (one layer's weight at a time).
    Quantized(crate::quant::QuantizedWeight),
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

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dequantized;
        let weight = match &self.weight {
            FrozenWeight::Dense(w) => w,
            FrozenWeight::Quantized(q) => {
                dequantized = q.dequantize()?.to_dtype(grad_res.dtype())?;
                &dequantized
            }
        };
        let grad_x = match grad_res.dims() {
            [b, s, o] => grad_res
                .reshape((b * s, *o))?
                .matmul(weight)?
                .reshape((*b, *s, ()))?,
            _ => grad_res.broadcast_matmul(weight)?,
        };
        Ok(Some(grad_x.to_dtype(arg.dtype())?))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Without gradients the ops give the same values and record nothing, and the flag is
    /// restored afterwards.
    #[test]
    fn without_grad_gives_the_same_values_untracked() {
        let mut rng = crate::init::seeded_rng(5);
        let x = Var::from_tensor(
            &crate::init::normal(&mut rng, &[2, 3, 8], 1.0, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let w = crate::init::normal(&mut rng, &[4, 8], 1.0, DType::F32, &Device::Cpu).unwrap();
        let with = linear(x.as_tensor(), &w, None).unwrap();
        assert!(with.track_op());
        let without = without_grad(|| linear(x.as_tensor(), &w, None).unwrap());
        assert!(!without.track_op());
        let diff = (with - &without)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        assert!(grad_enabled());
    }

    /// The backward that recomputes the probabilities gives what the one that kept them gives.
    #[test]
    fn recomputed_and_kept_probabilities_give_the_same_gradients() {
        let mut rng = crate::init::seeded_rng(3);
        let mut var = |shape: &[usize]| {
            Var::from_tensor(
                &crate::init::normal(&mut rng, shape, 1.0, DType::F64, &Device::Cpu).unwrap(),
            )
            .unwrap()
        };
        let (q, k, v) = (var(&[2, 5, 8]), var(&[2, 7, 4]), var(&[2, 7, 4]));
        let spec = AttentionSpec {
            heads: 2,
            kv_heads: 1,
            causal: true,
            key_bias: None,
        };
        let grads = |limit: usize| {
            let out = attention_keeping(q.as_tensor(), k.as_tensor(), v.as_tensor(), &spec, limit)
                .unwrap();
            let g = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            [&q, &k, &v].map(|x| {
                g.get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
        };
        let (kept, recomputed) = (grads(usize::MAX), grads(0));
        for (a, b) in kept.iter().zip(&recomputed) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-12, "{x} vs {y}");
            }
        }
    }
}
