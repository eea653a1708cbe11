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

/// A generator's position in its stream, as a `[4]` u32 tensor (for checkpoints).
pub fn rng_position(rng: &SeededRng) -> Result<Tensor> {
    let pos = rng.get_word_pos();
    let words: Vec<u32> = (0..4).map(|i| (pos >> (32 * i)) as u32).collect();
    Tensor::new(words, &Device::Cpu)
}

/// Moves `rng` to a position [`rng_position`] returned.
pub fn set_rng_position(rng: &mut SeededRng, position: &Tensor) -> Result<()> {
    let words = position.to_vec1::<u32>()?;
    if words.len() != 4 {
        candle_core::bail!("an RNG position has 4 words, found {}", words.len());
    }
    let pos = words
        .iter()
        .enumerate()
        .fold(0u128, |acc, (i, &w)| acc | (u128::from(w) << (32 * i)));
    rng.set_word_pos(pos);
    Ok(())
}

/// Inverted dropout with its own seeded generator. Hooks run behind `&self`, so the generator
/// sits behind a lock; its position belongs in checkpoints (see [`Dropout::state`]) so that a
/// resumed run draws the same masks as an uninterrupted one.
pub struct Dropout {
    p: f64,
    rng: std::sync::Mutex<SeededRng>,
    /// Masks are drawn only while training (an adapter's `set_training`); off at first.
    training: std::sync::atomic::AtomicBool,
}

impl Dropout {
    /// Key of the generator's position in a method's training state.
    pub const STATE_KEY: &'static str = "dropout_rng";

    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            rng: std::sync::Mutex::new(seeded_rng(seed)),
            training: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Training mode draws masks; evaluation mode leaves inputs as they are.
    pub fn set_training(&self, training: bool) {
        self.training
            .store(training, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    /// While training, a scale mask of `shape` (each entry 0 with probability p, else
    /// 1 / (1 - p)); `None` when p is 0 or in evaluation mode.
    pub fn mask(&self, shape: &[usize], dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        if self.p == 0.0 || !self.training.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let mut rng = self.generator()?;
        let keep = uniform(&mut rng, shape, 1.0, DType::F64, &Device::Cpu)?
            .affine(0.5, 0.5)?
            .ge(self.p)?
            .to_dtype(dtype)?;
        Ok(Some((keep / (1.0 - self.p))?.to_device(device)?))
    }

    /// Where the generator stands in its stream: [`Dropout::rewind`] to it draws the same
    /// masks again (gradient checkpointing recomputes a block with its forward's masks).
    pub fn position(&self) -> Result<u128> {
        Ok(self.generator()?.get_word_pos())
    }

    /// Moves the generator back (or on) to a [`Dropout::position`].
    pub fn rewind(&self, position: u128) -> Result<()> {
        self.generator()?.set_word_pos(position);
        Ok(())
    }

    fn generator(&self) -> Result<std::sync::MutexGuard<'_, SeededRng>> {
        self.rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout RNG lock poisoned".into()))
    }

    /// A mask for `x` (its shape, dtype and device), as [`Dropout::mask`] draws it.
    pub fn mask_like(&self, x: &Tensor) -> Result<Option<Tensor>> {
        self.mask(x.dims(), x.dtype(), x.device())
    }

    /// `x` with dropout applied (while training).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self.mask(x.dims(), x.dtype(), x.device())? {
            Some(mask) => x * mask,
            None => Ok(x.clone()),
        }
    }

    /// The generator's position, under [`Dropout::STATE_KEY`].
    pub fn state(&self) -> Result<(String, Tensor)> {
        let rng = self.generator()?;
        Ok((Self::STATE_KEY.to_string(), rng_position(&rng)?))
    }

    /// Restores the position from a training state, if it holds one.
    pub fn restore(&self, state: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        if let Some(position) = state.get(Self::STATE_KEY) {
            set_rng_position(&mut *self.generator()?, position)?;
        }
        Ok(())
    }
}
