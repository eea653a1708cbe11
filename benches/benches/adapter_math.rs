//! Criterion benchmarks of the adapter math at MiniLM's size (1024 tokens x 384), forward and
//! backward separately: the frozen base projection, LoRA's low-rank update beside it
//! (`x · Aᵀ · Bᵀ · s`, r = 8) composed of candle ops and as graft's fused op, and IA3's
//! rescaling, each trained through the frozen base.
use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use graft_model::init;
use graft_model::ops::{linear, linear_low_rank, low_rank_delta};
use graft_model::LowRank;

fn random(shape: &[usize], std: f64, seed: u64) -> Tensor {
    let mut rng = init::seeded_rng(seed);
    init::normal(&mut rng, shape, std, DType::F32, &Device::Cpu).unwrap()
}

fn adapters(c: &mut Criterion) {
    // OpenBLAS's kernels for this CPU, as the graft binary runs them.
    graft_model::runtime::init();
    let (h, r) = (384, 8);
    let weight = random(&[h, h], 0.05, 0);
    let bias = random(&[h], 0.05, 1);
    let input = Var::from_tensor(&random(&[8, 128, h], 1.0, 2)).unwrap();
    let lora_a = Var::from_tensor(&random(&[r, h], 0.05, 3)).unwrap();
    let lora_b = Var::from_tensor(&random(&[h, r], 0.05, 4)).unwrap();
    let ia3 = Var::from_tensor(&Tensor::ones((h, 1), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let x = input.as_tensor();
    let base = || linear(x, &weight, Some(&bias)).unwrap();
    let update = || -> candle_core::Result<LowRank> {
        Ok(LowRank {
            a: lora_a.as_tensor().clone(),
            b: (lora_b.as_tensor() * 2.0)?,
            input_mask: None,
        })
    };
    let lora = || base() + low_rank_delta(x, &update()?)?;
    let lora_fused = || linear_low_rank(x, &weight, Some(&bias), &update()?);
    let ia3_scaled = || base().broadcast_mul(&ia3.as_tensor().t()?);
    let cases: [(&str, &dyn Fn() -> candle_core::Result<Tensor>); 4] = [
        ("frozen projection", &|| Ok(base())),
        ("LoRA r=8 composed", &lora),
        ("LoRA r=8 fused", &lora_fused),
        ("IA3", &ia3_scaled),
    ];
    let mut g = c.benchmark_group("adapter math 8x128x384");
    g.sample_size(20);
    for (name, forward) in cases {
        g.bench_function(format!("{name} forward"), |b| b.iter(|| forward().unwrap()));
        g.bench_function(format!("{name} backward"), |b| {
            b.iter_batched(
                || forward().unwrap().sum_all().unwrap(),
                |loss| loss.backward().unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, adapters);
criterion_main!(benches);
