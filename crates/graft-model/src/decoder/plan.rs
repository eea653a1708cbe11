//! What a decoder checkpoint holds, derived from its config alone: the spec of the graph
//! ([`DecoderSpec`]) and every tensor by name and shape ([`Plan`]). The architecture modules
//! (`models::llama`, `models::chatglm`) produce it; `decoder::graph` builds the model from it.
use crate::error::{Error, Result};
use crate::hooks::SiteInfo;
use candle_core::{DType, Device};

/// Rotary position embedding as an architecture applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    /// Features of each head that rotate: the whole head in Llama, half of it in ChatGLM.
    pub rotary_dims: usize,
    /// Pairs (0, 1), (2, 3), ... (ChatGLM) instead of transformers' rotate_half.
    pub interleaved: bool,
    /// Llama 3.1's frequency scaling (`rope_scaling` with `rope_type` llama3).
    pub llama3: Option<Llama3Scaling>,
}

impl RopeSpec {
    /// The rotary frequencies before any scaling, `rotary_dims / 2` of them, in f32 as
    /// transformers computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        (0..self.rotary_dims / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f64 / self.rotary_dims as f64) as f32)
            .collect()
    }
}

/// Llama 3.1's `rope_scaling`: wavelengths longer than the original context over
/// `low_freq_factor` are slowed by `factor`, those shorter than it over `high_freq_factor` kept,
/// and those between blended (transformers' `_compute_llama3_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Llama3Scaling {
    /// `inv_freq` scaled, in f32 as transformers computes it.
    pub fn apply(&self, inv_freq: f32) -> f32 {
        let old = self.original_max_position_embeddings as f32;
        let (factor, low, high) = (
            self.factor as f32,
            self.low_freq_factor as f32,
            self.high_freq_factor as f32,
        );
        let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
        if wavelen < old / high {
            inv_freq
        } else if wavelen > old / low {
            inv_freq / factor
        } else {
            let smooth = (old / wavelen - low) / (high - low);
            (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
        }
    }
}

/// The shape facts of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    /// config.json's `model_type`: `llama`, `mistral`, `qwen2`, `chatglm`.
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeSpec,
    pub max_positions: usize,
    /// Key/value prefixes count as past positions, so the real tokens' positions start after
    /// them (transformers' Llama with PEFT's prefix tuning); ChatGLM's own P-tuning v2 starts
    /// them at 0.
    pub prefix_shifts_positions: bool,
}

/// How a block projects queries, keys and values (`L`: a loaded `layers::Linear`, or a
/// [`SiteSpec`] in a [`Plan`]).
pub enum Qkv<L> {
    /// `q_proj`, `k_proj`, `v_proj` (Llama).
    Separate { q: L, k: L, v: L },
    /// One `query_key_value` whose output is queries, then keys, then values (ChatGLM).
    Fused(L),
}

/// How a block projects the gate and the up branch of its SwiGLU.
pub enum GateUp<L> {
    /// `gate_proj`, `up_proj` (Llama).
    Separate { gate: L, up: L },
    /// One `dense_h_to_4h` whose output is the gate, then the up branch (ChatGLM).
    Fused(L),
}

impl<L> Qkv<L> {
    pub(crate) fn items(&self) -> Vec<&L> {
        match self {
            Self::Separate { q, k, v } => vec![q, k, v],
            Self::Fused(l) => vec![l],
        }
    }

    fn items_mut(&mut self) -> Vec<&mut L> {
        match self {
            Self::Separate { q, k, v } => vec![q, k, v],
            Self::Fused(l) => vec![l],
        }
    }

    pub(crate) fn try_map<M>(&self, mut f: impl FnMut(&L) -> Result<M>) -> Result<Qkv<M>> {
        Ok(match self {
            Self::Separate { q, k, v } => Qkv::Separate {
                q: f(q)?,
                k: f(k)?,
                v: f(v)?,
            },
            Self::Fused(l) => Qkv::Fused(f(l)?),
        })
    }
}

impl<L> GateUp<L> {
    pub(crate) fn items(&self) -> Vec<&L> {
        match self {
            Self::Separate { gate, up } => vec![gate, up],
            Self::Fused(l) => vec![l],
        }
    }

    fn items_mut(&mut self) -> Vec<&mut L> {
        match self {
            Self::Separate { gate, up } => vec![gate, up],
            Self::Fused(l) => vec![l],
        }
    }

    pub(crate) fn try_map<M>(&self, mut f: impl FnMut(&L) -> Result<M>) -> Result<GateUp<M>> {
        Ok(match self {
            Self::Separate { gate, up } => GateUp::Separate {
                gate: f(gate)?,
                up: f(up)?,
            },
            Self::Fused(l) => GateUp::Fused(f(l)?),
        })
    }
}

/// A projection as a checkpoint lays it out: `{name}.weight` `[out, in]`, maybe `{name}.bias`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub layer: Option<usize>,
}

impl SiteSpec {
    /// A maker of the sites of block `layer`, named `{prefix}.{name}`.
    pub fn in_layer(prefix: &str, layer: usize) -> impl Fn(&str, usize, usize, bool) -> Self + '_ {
        move |name, in_features, out_features, bias| Self {
            name: format!("{prefix}.{name}"),
            in_features,
            out_features,
            bias,
            layer: Some(layer),
        }
    }

    fn params(&self) -> usize {
        self.in_features * self.out_features + if self.bias { self.out_features } else { 0 }
    }

    fn info(&self) -> SiteInfo {
        SiteInfo {
            name: self.name.clone(),
            in_features: self.in_features,
            out_features: self.out_features,
            layer: self.layer,
        }
    }
}

/// One block: loaded (`decoder::Block`: `Linear`s and `RmsNorm`s) or planned (`BlockPlan`:
/// [`SiteSpec`]s and norm module names, each norm's tensor being `{name}.weight`).
pub struct BlockOf<L, N> {
    pub input_norm: N,
    pub qkv: Qkv<L>,
    pub attention_out: L,
    pub post_attention_norm: N,
    pub gate_up: GateUp<L>,
    pub down: L,
}

pub type BlockPlan = BlockOf<SiteSpec, String>;

impl<L, N> BlockOf<L, N> {
    /// The projections in model order: attention (q, k, v or the fused one; out), then the
    /// feed-forward (gate, up or the fused one; down).
    pub(crate) fn projections(&self) -> Vec<&L> {
        let mut out = self.qkv.items();
        out.push(&self.attention_out);
        out.extend(self.gate_up.items());
        out.push(&self.down);
        out
    }

    pub(crate) fn projections_mut(&mut self) -> Vec<&mut L> {
        let mut out = self.qkv.items_mut();
        out.push(&mut self.attention_out);
        out.extend(self.gate_up.items_mut());
        out.push(&mut self.down);
        out
    }
}

/// Every tensor of a decoder checkpoint by name and shape: what an architecture module
/// derives from its config, so that loading and `graft inspect` (which reads no weights) agree.
pub struct Plan {
    pub spec: DecoderSpec,
    /// The input embedding table `[vocab, hidden]`.
    pub embed: String,
    pub blocks: Vec<BlockPlan>,
    pub final_norm: String,
    /// `None`: tied to the input embeddings.
    pub lm_head: Option<SiteSpec>,
}

impl Plan {
    /// Every linear site, in model order.
    pub fn sites(&self) -> Vec<SiteInfo> {
        self.site_specs().map(SiteSpec::info).collect()
    }

    pub fn site_specs(&self) -> impl Iterator<Item = &SiteSpec> {
        self.blocks
            .iter()
            .flat_map(BlockPlan::projections)
            .chain(self.lm_head.as_ref())
    }

    /// Values in the checkpoint.
    pub fn param_count(&self) -> usize {
        let h = self.spec.hidden_size;
        let norms = (2 * self.blocks.len() + 1) * h;
        let sites: usize = self.site_specs().map(SiteSpec::params).sum();
        self.spec.vocab_size * h + norms + sites
    }

    /// Writes a model folder (config.json, model.safetensors) of this plan with random weights:
    /// norms near 1, projections and biases normal(0, 0.2), embeddings normal(0, 1).
    pub fn write_random(
        &self,
        dir: &std::path::Path,
        config_json: &serde_json::Value,
        seed: u64,
    ) -> Result<()> {
        let h = self.spec.hidden_size;
        let mut rng = crate::init::seeded_rng(seed);
        let mut tensors = Vec::new();
        let mut add = |name: String, shape: &[usize], std: f64, mean: f64| -> Result<()> {
            let t = crate::init::normal(&mut rng, shape, std, DType::F32, &Device::Cpu)?;
            tensors.push((name, (t + mean)?));
            Ok(())
        };
        add(self.embed.clone(), &[self.spec.vocab_size, h], 1.0, 0.0)?;
        let norms = self
            .blocks
            .iter()
            .flat_map(|b| [&b.input_norm, &b.post_attention_norm])
            .chain([&self.final_norm]);
        for norm in norms {
            add(format!("{norm}.weight"), &[h], 0.1, 1.0)?;
        }
        for s in self.site_specs() {
            add(
                format!("{}.weight", s.name),
                &[s.out_features, s.in_features],
                0.2,
                0.0,
            )?;
            if s.bias {
                add(format!("{}.bias", s.name), &[s.out_features], 0.2, 0.0)?;
            }
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        crate::formats::safetensors::save_safetensors(&dir.join("model.safetensors"), &tensors)?;
        crate::formats::safetensors::save_json(config_json, &dir.join("config.json"))
    }
}
