//! A decoder's weights made from its config alone (`--random-init`): every tensor the plan
//! names, drawn as the architecture's own code initialises it (normal with config.json's
//! `initializer_range`, else 0.02; norm weights 1; biases 0), tensor by tensor, each directly
//! in the run's dtype (or quantized as it is made), so that a 6B model can be built where its
//! f32 copy would not fit. Each tensor's values come from seeded streams (the seed, its name and
//! a block of its rows), which the cores draw in parallel: the same seed gives the same
//! model whatever the order or thread count, and a quantized weight is drawn and quantized a
//! block of rows at a time, never whole in f32.
use crate::decoder::Plan;
use crate::error::Result;
use crate::ops::parallel;
use crate::quant::QuantizedWeight;
use crate::weights::{Quantizing, Weights};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// The standard deviation of the weights: config.json's `initializer_range` (Llama, Qwen2),
/// else 0.02 (what those default to, and ChatGLM's configs do not set).
pub fn initializer_std(config: &serde_json::Value) -> f64 {
    config["initializer_range"].as_f64().unwrap_or(0.02)
}

/// A stream's seed from the model's seed, the tensor's name and the block of rows it draws.
fn stream_seed(seed: u64, name: &str, block: usize) -> u64 {
    let named = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    named
        ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (block as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// One tensor's values: rows of `width`, drawn N(0, std²) a block of rows at a time (the
/// blocks [`QuantizedWeight::rows_at_a_time`] quantizes), each block from its own stream.
struct Draw<'a> {
    name: &'a str,
    width: usize,
    std: f32,
    seed: u64,
}

impl Draw<'_> {
    /// Rows `rows` (whole blocks, or the last) as `T`, the blocks shared out over the pool's
    /// threads.
    fn rows<T: Copy + Default + Send>(
        &self,
        rows: std::ops::Range<usize>,
        convert: fn(f32) -> T,
    ) -> Vec<T> {
        let per_block = QuantizedWeight::rows_at_a_time(self.width);
        let block_values = per_block * self.width;
        let mut values = vec![T::default(); rows.len() * self.width];
        let total = values.len();
        let shared = parallel::SharedMut::new(&mut values);
        parallel::for_ranges(total.div_ceil(block_values), 1, |blocks| {
            for b in blocks {
                let seed = stream_seed(self.seed, self.name, rows.start / per_block + b);
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let range = b * block_values..((b + 1) * block_values).min(total);
                // SAFETY: each block index is handed to one task, and its range lies in `values`.
                for v in unsafe { shared.slice(range) } {
                    let z: f32 = rng.sample(rand_distr::StandardNormal);
                    *v = convert(z * self.std);
                }
            }
        });
        values
    }

    /// The whole tensor `[rows, width]` in `dtype` on `device`.
    fn tensor(&self, rows: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = (rows, self.width);
        let all = 0..rows;
        let host = match dtype {
            DType::BF16 => Tensor::from_vec(self.rows(all, bf16::from_f32), shape, &Device::Cpu)?,
            DType::F16 => Tensor::from_vec(self.rows(all, f16::from_f32), shape, &Device::Cpu)?,
            DType::F64 => Tensor::from_vec(self.rows(all, f64::from), shape, &Device::Cpu)?,
            _ => Tensor::from_vec(self.rows(all, |v| v), shape, &Device::Cpu)?,
        };
        Ok(host.to_device(device)?)
    }
}

/// Every tensor of `plan`, drawn with `std` from `seed` in `dtype` on `device`, the weights
/// `quantizing` names quantized as they are made (a block of rows drawn in f32 at a time).
/// `source` names the config in errors.
pub fn weights(
    plan: &Plan,
    std: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
    quantizing: Option<&Quantizing>,
    source: &Path,
) -> Result<Weights> {
    let h = plan.spec.hidden_size;
    let mut tensors = HashMap::new();
    let mut quantized = HashMap::new();
    let std = std as f32;
    tensors.insert(
        plan.embed.clone(),
        Draw {
            name: &plan.embed,
            width: h,
            std,
            seed,
        }
        .tensor(plan.spec.vocab_size, dtype, device)?,
    );
    let norms = plan
        .blocks
        .iter()
        .flat_map(|b| [&b.input_norm, &b.post_attention_norm])
        .chain([&plan.final_norm]);
    for norm in norms {
        tensors.insert(format!("{norm}.weight"), Tensor::ones(h, dtype, device)?);
    }
    for site in plan.site_specs() {
        let name = format!("{}.weight", site.name);
        let (out, width) = (site.out_features, site.in_features);
        let values = Draw {
            name: &name,
            width,
            std,
            seed,
        };
        let kept = match quantizing {
            Some(q) if q.keys.contains(&name) => QuantizedWeight::quantize_rows(
                (out, width),
                q.family,
                dtype,
                device,
                &mut |rows| {
                    let n = rows.len();
                    Ok(Tensor::from_vec(
                        values.rows(rows, |v| v),
                        (n, width),
                        &Device::Cpu,
                    )?)
                },
            )?,
            _ => None,
        };
        match kept {
            Some(blocks) => {
                quantized.insert(name.clone(), blocks);
            }
            None => {
                tensors.insert(name.clone(), values.tensor(out, dtype, device)?);
            }
        }
        if site.bias {
            let bias = Tensor::zeros(site.out_features, dtype, device)?;
            tensors.insert(format!("{}.bias", site.name), bias);
        }
    }
    Weights::from_parts(source, tensors, quantized, dtype)
}
