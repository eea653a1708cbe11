//! Criterion benchmarks of the fused CPU kernels at the sizes of a MiniLM training batch (8 x 128
//! tokens, hidden 384, 12 heads, FFN 1536), forward and backward separately, each beside the
//! candle composition it replaces (`ops::reference`): layer norm, GELU, attention (and over a
//! packed q/k/v), the frozen and trained projections, the packed q/k/v projection with low-rank
//! updates, and BERT's attention-output and feed-forward blocks with their add & norm.
//!
//! `cargo bench -p graft-benches --bench kernels` (or `cargo xtask bench --kernels`).
use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use graft_model::init;
use graft_model::ops::{self, reference, AttentionSpec};

type Op<'a> = dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + 'a;

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = init::seeded_rng(seed);
    init::normal(&mut rng, shape, 1.0, DType::F32, &Device::Cpu).unwrap()
}

/// Forward (building the graph) and backward of `sum(op(inputs))` for the fused op and its
/// reference, every input a trainable variable.
fn pair(c: &mut Criterion, group: &str, shapes: &[&[usize]], fused: &Op<'_>, slow: &Op<'_>) {
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Var::from_tensor(&random(s, i as u64)).unwrap())
        .collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let mut g = c.benchmark_group(group);
    g.sample_size(20);
    for (name, op) in [("fused", fused), ("candle composition", slow)] {
        g.bench_function(format!("{name} forward"), |b| {
            b.iter(|| op(&inputs).unwrap())
        });
        g.bench_function(format!("{name} backward"), |b| {
            b.iter_batched(
                || op(&inputs).unwrap().sum_all().unwrap(),
                |loss| loss.backward().unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn kernels(c: &mut Criterion) {
    // OpenBLAS's kernels for this CPU, as the graft binary runs them.
    graft_model::runtime::init();
    let (tokens, hidden, ffn) = ([8, 128], 384, 1536);
    pair(
        c,
        "layer_norm 8x128x384",
        &[&[tokens[0], tokens[1], hidden], &[hidden], &[hidden]],
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-12),
        &|t| reference::layer_norm(&t[0], &t[1], &t[2], 1e-12),
    );
    pair(
        c,
        "gelu_erf 8x128x1536",
        &[&[tokens[0], tokens[1], ffn]],
        &|t| ops::gelu_erf(&t[0]),
        &|t| reference::gelu_erf(&t[0]),
    );
    // The last 28 keys of every other row are padding, as in a real batch.
    let mask: Vec<f32> = (0..tokens[0] * tokens[1])
        .map(|i| f32::from(!((i / 128) % 2 == 1 && i % 128 >= 100)))
        .collect();
    let mask = Tensor::from_vec(mask, (tokens[0], tokens[1]), &Device::Cpu).unwrap();
    let bias = ops::additive_mask(&mask, DType::F32).unwrap();
    let spec = AttentionSpec {
        heads: 12,
        kv_heads: 12,
        causal: false,
        key_bias: Some(&bias),
    };
    let qkv: &[&[usize]] = &[&[8, 128, hidden], &[8, 128, hidden], &[8, 128, hidden]];
    pair(
        c,
        "attention 8x128, 12 heads",
        qkv,
        &|t| ops::attention(&t[0], &t[1], &t[2], &spec),
        &|t| reference::attention(&t[0], &t[1], &t[2], &spec),
    );
    // A frozen projection: only the input is trained, as for every base weight under LoRA.
    let weight = random(&[ffn, hidden], 7);
    let bias = random(&[ffn], 8);
    pair(
        c,
        "linear 1024x384 -> 1536, frozen weight",
        &[&[8, 128, hidden]],
        &|t| ops::linear(&t[0], &weight, Some(&bias)),
        &|t| reference::linear(&t[0], &weight, Some(&bias)),
    );
    // Query, key and value as one packed product, LoRA r=8 updates on the query and value
    // columns (the trained inputs: x and the four factors).
    let w_qkv = random(&[3 * hidden, hidden], 9);
    let b_qkv = random(&[3 * hidden], 10);
    let lora: &[&[usize]] = &[
        &[8, 128, hidden],
        &[8, hidden],
        &[hidden, 8],
        &[8, hidden],
        &[hidden, 8],
    ];
    let updates = |t: &[Tensor]| {
        [(0..hidden, 1), (2 * hidden..3 * hidden, 3)].map(|(columns, i)| {
            let update = graft_model::LowRank {
                a: t[i].clone(),
                b: t[i + 1].clone(),
                input_mask: None,
            };
            (columns, update)
        })
    };
    pair(
        c,
        "packed q/k/v 1024x384 -> 3x384 with two LoRA r=8 updates",
        lora,
        &|t| {
            let updates = updates(t);
            let refs: Vec<_> = updates.iter().map(|(c, u)| (c.clone(), u)).collect();
            ops::linear_low_ranks(&t[0], &w_qkv, Some(&b_qkv), &refs)
        },
        &|t| {
            let base = reference::linear(&t[0], &w_qkv, Some(&b_qkv))?;
            let delta = |i: usize| {
                reference::linear(&reference::linear(&t[0], &t[i], None)?, &t[i + 1], None)
            };
            Tensor::cat(
                &[
                    (base.narrow(2, 0, hidden)? + delta(1)?)?,
                    base.narrow(2, hidden, hidden)?,
                    (base.narrow(2, 2 * hidden, hidden)? + delta(3)?)?,
                ],
                2,
            )
        },
    );
    pair(
        c,
        "attention over packed q/k/v 8x128, 12 heads",
        &[&[8, 128, 3 * hidden]],
        &|t| ops::attention_packed(&t[0], &spec),
        &|t| {
            let part = |i: usize| t[0].narrow(2, i * hidden, hidden);
            reference::attention(&part(0)?, &part(1)?, &part(2)?, &spec)
        },
    );
    // BERT's attention output and feed-forward blocks with their add & norm, frozen tensors.
    let w_out = random(&[hidden, hidden], 11);
    let w_down = random(&[hidden, ffn], 12);
    let [b_hidden, gamma, beta] = [13, 14, 15].map(|seed| random(&[hidden], seed));
    let norm = |weight: &Tensor| ops::ResidualNorm {
        weight: weight.clone(),
        bias: Some(b_hidden.clone()),
        gamma: gamma.clone(),
        beta: beta.clone(),
        eps: 1e-12,
    };
    let attention_out = norm(&w_out);
    pair(
        c,
        "attention output + add & norm 1024x384",
        &[&[8, 128, hidden], &[8, 128, hidden]],
        &|t| ops::projection_norm(&t[0], &t[1], &attention_out),
        &|t| {
            let sum = (reference::linear(&t[0], &w_out, Some(&b_hidden))? + &t[1])?;
            reference::layer_norm(&sum, &gamma, &beta, 1e-12)
        },
    );
    let block = ops::FeedForward {
        w_in: weight.clone(),
        b_in: Some(bias.clone()),
        out: norm(&w_down),
    };
    pair(
        c,
        "feed-forward block + add & norm 1024x384, ffn 1536",
        &[&[8, 128, hidden]],
        &|t| ops::feed_forward_block(&t[0], &block),
        &|t| {
            let inner = reference::gelu_erf(&reference::linear(&t[0], &weight, Some(&bias))?)?;
            let out = reference::linear(&inner, &w_down, Some(&b_hidden))?;
            reference::layer_norm(&(out + &t[0])?, &gamma, &beta, 1e-12)
        },
    );
    pair(
        c,
        "linear 1024x384 -> 1536, trained weight (full fine-tuning)",
        &[&[8, 128, hidden], &[ffn, hidden], &[ffn]],
        &|t| ops::linear(&t[0], &t[1], Some(&t[2])),
        &|t| reference::linear(&t[0], &t[1], Some(&t[2])),
    );
}

criterion_group!(benches, kernels);
criterion_main!(benches);
