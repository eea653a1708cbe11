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

/// Rounds of [`counter_keep`]'s network.
const ROUNDS: usize = 4;

/// A keep mask (u8: 1 with probability 1 - p) of `shape`, made on `device` by tensor ops from
/// [`ROUNDS`] keys drawn from `rng` (its only draws) and each entry's index: the index's two
/// 16-bit halves go through a Feistel network keyed by them (round function: the square
/// modulo the prime 65521), a permutation of 32-bit counters, and an entry is kept where its
/// counter's image reaches p · 2^32. All in u32 arithmetic whose intermediates stay below
/// 2^32, so every device makes the same mask; an entry's value depends on its flat index
/// only, not on the shape.
pub fn counter_keep(
    rng: &mut SeededRng,
    p: f64,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    const HALF: u32 = 1 << 16;
    const PRIME: u32 = 65521;
    let keys: Vec<u32> = (0..ROUNDS).map(|_| rng.random_range(0..PRIME)).collect();
    let n: usize = shape.iter().product();
    if n > u32::MAX as usize {
        candle_core::bail!("a dropout mask of {n} entries outruns its 32-bit counters");
    }
    if n == 0 {
        return Tensor::zeros(shape, DType::U8, device);
    }
    // Counter i is (i / 2^16, i % 2^16): the rows and columns of a [rows, width] grid.
    let width = n.min(HALF as usize);
    let rows = n.div_ceil(width);
    let constant = |v: u32| Tensor::full(v, (), device);
    let (prime, half) = (constant(PRIME)?, constant(HALF)?);
    let modulo = |x: &Tensor, m: &Tensor| x - x.broadcast_div(m)?.broadcast_mul(m)?;
    let mut left = crate::ops::arange(rows, device)?.reshape((rows, 1))?;
    let mut right = crate::ops::arange(width, device)?.reshape((1, width))?;
    for key in keys {
        // right + key < 2^17, y² < 65521², left + f < 2^17.
        let y = modulo(&right.affine(1.0, f64::from(key))?, &prime)?;
        let f = modulo(&(&y * &y)?, &prime)?;
        let mixed = modulo(&left.broadcast_add(&f)?, &half)?;
        left = std::mem::replace(&mut right, mixed);
    }
    let image = right.affine(f64::from(HALF), 0.0)?.broadcast_add(&left)?;
    let threshold = (p * 2f64.powi(32)).round().min(f64::from(u32::MAX)) as u32;
    image
        .broadcast_ge(&constant(threshold)?)?
        .flatten_all()?
        .narrow(0, 0, n)?
        .reshape(shape)
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
    /// 1 / (1 - p)) in `dtype` on `device`; `None` when p is 0 or in evaluation mode.
    ///
    /// On the CPU the generator draws every entry (in f64, as pinned runs were made). Off it,
    /// and on the CPU under `GRAFT_REFERENCE_OPS`, the generator draws only [`counter_keep`]'s
    /// keys and the mask is made on the device: nothing is uploaded per entry, and a
    /// [`Dropout::rewind`] replays it as well.
    pub fn mask(&self, shape: &[usize], dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        if self.p == 0.0 || !self.training.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let mut rng = self.generator()?;
        let keep = if device.is_cpu() && !crate::ops::reference_forced() {
            uniform(&mut rng, shape, 1.0, DType::F64, &Device::Cpu)?
                .affine(0.5, 0.5)?
                .ge(self.p)?
        } else {
            counter_keep(&mut rng, self.p, shape, device)?
        };
        Ok(Some(
            (keep.to_dtype(dtype)? / (1.0 - self.p))?.to_device(device)?,
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps 1 - p of the entries, with neighbours (next entry, next row of counters) and the
    /// masks of successive draws as independent as coin flips; the same generator position
    /// gives the same mask, whose entries do not depend on the shape.
    #[test]
    fn counter_masks_keep_the_right_share_independently() {
        let n = 300_000;
        let device = Device::Cpu;
        for p in [0.1, 0.5] {
            let mut rng = seeded_rng(21);
            let start = rng.get_word_pos();
            let draw = |rng: &mut SeededRng, shape: &[usize]| {
                let mask = counter_keep(rng, p, shape, &device).unwrap();
                assert_eq!(mask.dtype(), DType::U8);
                mask.flatten_all().unwrap().to_vec1::<u8>().unwrap()
            };
            let first = draw(&mut rng, &[n]);
            let second = draw(&mut rng, &[n]);
            // Five standard deviations of a share of n (or fewer) coin flips.
            let close = |share: f64, q: f64, count: usize| {
                let bound = 5.0 * (q * (1.0 - q) / count as f64).sqrt();
                assert!((share - q).abs() < bound, "p {p}: {share} against {q}");
            };
            let share = |hits: usize, count: usize| hits as f64 / count as f64;
            let dropped = first.iter().filter(|&&k| k == 0).count();
            close(share(dropped, n), p, n);
            for step in [1, 1 << 16] {
                let both = (0..n - step)
                    .filter(|&i| first[i] == 0 && first[i + step] == 0)
                    .count();
                close(share(both, n - step), p * p, n - step);
            }
            let agree = (0..n).filter(|&i| first[i] == second[i]).count();
            close(share(agree, n), p * p + (1.0 - p) * (1.0 - p), n);
            rng.set_word_pos(start);
            assert_eq!(draw(&mut rng, &[n]), first);
            rng.set_word_pos(start);
            assert_eq!(draw(&mut rng, &[7, 100]), first[..700]);
        }
    }
}
