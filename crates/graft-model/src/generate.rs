//! Text generation with a decoder: greedy or sampled (temperature, top-k, top-p), one token at a
//! time through a key/value cache, with any method's hooks active.
use crate::decoder::{Decoder, DecoderInputs, KvCache};
use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::init;
use candle_core::{DType, Tensor, D};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); above 0, logits are divided by it and sampled.
    pub temperature: f64,
    /// Sample only among the `top_k` most likely tokens; 0 for no limit.
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to `top_p`.
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidConfig(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidConfig(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Continues `prompt` by up to `max_new_tokens` tokens, stopping after any of `stop`; returns the
/// new tokens (a stop token included). `on_token` sees each one as it is chosen.
pub fn generate(
    model: &Decoder,
    hooks: &dyn Hooks,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    sampling: &Sampling,
    on_token: &mut dyn FnMut(u32),
) -> Result<Vec<u32>> {
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidConfig(
            "generation needs at least one prompt token".into(),
        ));
    }
    let mut rng = init::seeded_rng(sampling.seed);
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    let mut next_input = prompt.to_vec();
    while out.len() < max_new_tokens {
        let inputs = DecoderInputs {
            input_ids: Tensor::from_slice(&next_input, (1, next_input.len()), model.device())?,
            attention_mask: None,
        };
        let hidden = model.forward(&inputs, hooks, Some(&mut cache))?;
        let last = hidden.narrow(1, next_input.len() - 1, 1)?.squeeze(1)?;
        let logits = model
            .lm_head(&last, hooks)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        let token = pick(&logits, sampling, &mut rng)?;
        out.push(token);
        on_token(token);
        if stop.contains(&token) {
            break;
        }
        next_input = vec![token];
    }
    Ok(out)
}

/// Next token from logits `[vocab]`.
fn pick(logits: &Tensor, sampling: &Sampling, rng: &mut init::SeededRng) -> Result<u32> {
    if sampling.temperature == 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let scaled: Vec<f32> = (logits / sampling.temperature)?.to_vec1()?;
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]));
    if sampling.top_k > 0 {
        order.truncate(sampling.top_k);
    }
    let max = scaled[order[0]];
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| f64::from(scaled[i] - max).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    // Nucleus: the smallest head of the ranking whose probability reaches top_p.
    let mut kept = 0;
    let mut mass = 0.0;
    while kept < order.len() && (kept == 0 || mass < sampling.top_p) {
        mass += weights[kept] / total;
        kept += 1;
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    let mut draw = rng.random::<f64>() * kept_total;
    for (i, w) in weights[..kept].iter().enumerate() {
        if draw < *w {
            return Ok(order[i] as u32);
        }
        draw -= w;
    }
    Ok(order[kept - 1] as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 7,
        }
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = Tensor::new(&[0.1f32, 2.0, -1.0, 1.9], &Device::Cpu).unwrap();
        let mut rng = init::seeded_rng(1);
        for s in [sampling(1.0, 1, 1.0), sampling(1.0, 0, 1e-6)] {
            for _ in 0..20 {
                assert_eq!(pick(&logits, &s, &mut rng).unwrap(), 1);
            }
        }
    }

    #[test]
    fn sampling_follows_the_probabilities() {
        let logits = Tensor::new(&[0.0f32, (3.0f32).ln()], &Device::Cpu).unwrap();
        let mut rng = init::seeded_rng(2);
        let s = sampling(1.0, 0, 1.0);
        let ones = (0..4000)
            .filter(|_| pick(&logits, &s, &mut rng).unwrap() == 1)
            .count();
        // p = 0.75; four standard deviations of 4000 draws is about 0.027.
        let share = ones as f64 / 4000.0;
        assert!((share - 0.75).abs() < 0.03, "share {share}");
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(sampling(-1.0, 0, 1.0).validate().is_err());
        assert!(sampling(1.0, 0, 0.0).validate().is_err());
        assert!(sampling(1.0, 0, 1.5).validate().is_err());
    }
}
