//! Seeded initialisers. candle's CPU device cannot be seeded, so every random initial tensor in
//! graft comes from a [`SeededRng`] that the caller owns.
use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};

pub type SeededRng = rand_chacha::ChaCha8Rng;

pub fn seeded_rng(seed: u64) -> SeededRng {
    SeededRng::seed_from_u64(seed)
}

/// Uniform on `[-bound, bound)`.
pub fn uniform(
    rng: &mut SeededRng,
    shape: &[usize],
    bound: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
}

/// Normal with mean 0 and standard deviation `std` (Box-Muller).
pub fn normal(
    rng: &mut SeededRng,
    shape: &[usize],
    std: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
}

/// `n` ids drawn uniformly from `0..upper` (e.g. token ids).
pub fn random_ids(rng: &mut SeededRng, n: usize, upper: u32) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..upper.max(1))).collect()
}

/// torch's `kaiming_uniform_(w, a=sqrt(5))` bound for a weight with `fan_in` inputs, which
/// nn.Linear and PEFT's LoRA A use: 1/sqrt(fan_in).
pub fn kaiming_uniform_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

/// Inverted-dropout mask of `shape`: each entry 0 with probability `p`, else `1 / (1 - p)`.
pub fn dropout_mask(
    rng: &mut SeededRng,
    shape: &[usize],
    p: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keep = uniform(rng, shape, 1.0, DType::F64, &Device::Cpu)?
        .affine(0.5, 0.5)?
        .ge(p)?
        .to_dtype(dtype)?;
    (keep / (1.0 - p))?.to_device(device)
}
