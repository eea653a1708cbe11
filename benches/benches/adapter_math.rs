//! Criterion benchmarks of the adapter-path kernels at MiniLM's size (1024 tokens x 384):
//! a frozen projection's forward and backward through `frozen_linear` (input gradient only)
//! against candle's matmul (which also computes the weight gradient).
use candle_core::{DType, Device, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use graft_model::init;
use graft_model::ops::{linear, reference};

fn projection(c: &mut Criterion) {
    let mut rng = init::seeded_rng(0);
    let weight = init::normal(&mut rng, &[384, 384], 0.05, DType::F32, &Device::Cpu).unwrap();
    let input = Var::from_tensor(
        &init::normal(&mut rng, &[8, 128, 384], 1.0, DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let trainable_weight = Var::from_tensor(&weight).unwrap();
    let mut group = c.benchmark_group("projection 8x128x384");
    group.sample_size(20);
    group.bench_function("frozen_linear forward", |b| {
        b.iter(|| linear(input.as_tensor(), &weight, None).unwrap())
    });
    group.bench_function("frozen_linear forward+backward", |b| {
        b.iter(|| {
            let y = linear(input.as_tensor(), &weight, None).unwrap();
            y.sum_all().unwrap().backward().unwrap()
        })
    });
    group.bench_function(
        "candle matmul forward+backward (weight gradient too)",
        |b| {
            b.iter(|| {
                let y = reference::linear(input.as_tensor(), trainable_weight.as_tensor(), None)
                    .unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        },
    );
    group.finish();
}

criterion_group!(benches, projection);
criterion_main!(benches);
