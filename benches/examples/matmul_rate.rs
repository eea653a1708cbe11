//! This machine's matmul rate through candle (gemm crate), at the shapes of a MiniLM step.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    for (m, k, n) in [(1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
        for _ in 0..3 {
            a.matmul(&b)?;
        }
        let reps = 50;
        let t = Instant::now();
        for _ in 0..reps {
            a.matmul(&b)?;
        }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{m}x{k}x{n}: {:.2} ms, {:.0} GFLOP/s",
            dt * 1e3,
            2.0 * (m * k * n) as f64 / dt / 1e9
        );
    }
    Ok(())
}
