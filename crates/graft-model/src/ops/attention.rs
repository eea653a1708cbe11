//! Scaled dot-product attention.
use super::dispatch::{fused, input};
use super::types::AttentionSpec;
use super::{cpu, reference};
use candle_core::{Result, Tensor};

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

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
