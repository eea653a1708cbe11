//! This machine's matmul rate at the shapes of a MiniLM step: candle's matmul (the gemm crate)
//! against graft's `ops::linear` (OpenBLAS when installed, else the same gemm crate).
//!
//! `cargo run --release -p graft-benches --example matmul_rate`
use candle_core::{Device, Tensor};
use std::time::Instant;

fn rate(what: &str, (m, k, n): (usize, usize, usize), f: impl Fn() -> candle_core::Result<Tensor>) {
    for _ in 0..3 {
        f().unwrap();
    }
    let reps = 50;
    let started = Instant::now();
    for _ in 0..reps {
        f().unwrap();
    }
    let seconds = started.elapsed().as_secs_f64() / reps as f64;
    let gflops = 2.0 * (m * k * n) as f64 / seconds / 1e9;
    println!(
        "{what:<28} {m}x{k}x{n}: {:6.2} ms, {gflops:4.0} GFLOP/s",
        seconds * 1e3
    );
}

fn main() -> candle_core::Result<()> {
    graft_model::runtime::init();
    println!("graft's matmul: {}", graft_model::ops::matmul_path());
    for (m, k, n) in [
        (1024, 384, 1536),
        (1024, 1536, 384),
        (1024, 384, 384),
        (4096, 384, 1536),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let wt = w.t()?.contiguous()?;
        rate("candle matmul", (m, k, n), || x.matmul(&wt));
        rate("graft ops::linear", (m, k, n), || {
            graft_model::ops::linear(&x, &w, None)
        });
    }
    Ok(())
}
