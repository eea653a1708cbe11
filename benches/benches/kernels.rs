//! Criterion benchmarks of every fused CPU kernel at the sizes of a MiniLM training batch
//! (8 x 128 tokens, hidden 384, 12 heads, FFN 1536), forward and backward separately, each
//! beside the candle composition it replaces (`ops::reference`).
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
