//! The Llama family as transformers defines it: Llama, Mistral (grouped-query attention),
//! Qwen2 (biases on q, k, v), tied or untied embeddings. Sites are named like transformers'
//! module paths (`model.layers.3.self_attn.q_proj`).
use crate::decoder::{BlockPlan, DecoderSpec, GateUp, Plan, Qkv, RopeSpec, SiteSpec};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The fields of a Llama-family config.json that the forward pass depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Set where heads are not `hidden_size / num_attention_heads` wide.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v and o (Llama's `attention_bias`); Qwen2 has them on q, k, v always.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    4096
}
fn default_hidden_act() -> String {
    "silu".into()
}

/// The `model_type`s this module reads.
pub const MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

impl Config {
    pub fn validate(&self) -> Result<()> {
        if !MODEL_TYPES.contains(&self.model_type.as_str()) {
            return Err(Error::InvalidConfig(format!(
                "model_type `{}` is not a Llama-family architecture ({})",
                self.model_type,
                MODEL_TYPES.join(", ")
            )));
        }
        if self.hidden_act != "silu" {
            return Err(Error::InvalidConfig(format!(
                "hidden_act `{}` is not supported (silu)",
                self.hidden_act
            )));
        }
        self.llama3_scaling()?;
        if self.num_attention_heads == 0 || self.head_dim() == 0 {
            return Err(Error::InvalidConfig(format!(
                "{} heads over a hidden size of {}",
                self.num_attention_heads, self.hidden_size
            )));
        }
        Ok(())
    }

    /// Llama 3.1's `rope_scaling` (`rope_type` llama3), if the config has one; any other kind
    /// is refused, since positions would silently differ.
    pub fn llama3_scaling(&self) -> Result<Option<crate::decoder::Llama3Scaling>> {
        let Some(scaling) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let kind = scaling["rope_type"]
            .as_str()
            .or_else(|| scaling["type"].as_str())
            .unwrap_or("");
        let field = |name: &str| {
            scaling[name].as_f64().ok_or_else(|| {
                Error::InvalidConfig(format!("rope_scaling ({kind}) lacks a number `{name}`"))
            })
        };
        if kind != "llama3" {
            return Err(Error::InvalidConfig(format!(
                "rope_scaling of type `{kind}` is not supported (llama3 is): positions would silently differ"
            )));
        }
        Ok(Some(crate::decoder::Llama3Scaling {
            factor: field("factor")?,
            low_freq_factor: field("low_freq_factor")?,
            high_freq_factor: field("high_freq_factor")?,
            original_max_position_embeddings: field("original_max_position_embeddings")?,
        }))
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    pub fn spec(&self) -> DecoderSpec {
        DecoderSpec {
            model_type: self.model_type.clone(),
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_kv_heads(),
            head_dim: self.head_dim(),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope: RopeSpec {
                theta: self.rope_theta,
                rotary_dims: self.head_dim(),
                interleaved: false,
                // validate() refuses the configs this cannot read.
                llama3: self.llama3_scaling().ok().flatten(),
            },
            max_positions: self.max_position_embeddings,
            prefix_shifts_positions: true,
        }
    }
}

/// Every tensor of the checkpoint, named as transformers names them
/// (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
pub fn plan(config: &Config) -> Result<Plan> {
    config.validate()?;
    let spec = config.spec();
    let (h, d, f) = (config.hidden_size, spec.head_dim, config.intermediate_size);
    let (q_width, kv_width) = (spec.num_heads * d, spec.num_kv_heads * d);
    let qkv_bias = config.qkv_bias();
    let blocks = (0..config.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let site = SiteSpec::in_layer(&p, i);
            BlockPlan {
                input_norm: format!("{p}.input_layernorm"),
                qkv: Qkv::Separate {
                    q: site("self_attn.q_proj", h, q_width, qkv_bias),
                    k: site("self_attn.k_proj", h, kv_width, qkv_bias),
                    v: site("self_attn.v_proj", h, kv_width, qkv_bias),
                },
                attention_out: site("self_attn.o_proj", q_width, h, config.attention_bias),
                post_attention_norm: format!("{p}.post_attention_layernorm"),
                gate_up: GateUp::Separate {
                    gate: site("mlp.gate_proj", h, f, config.mlp_bias),
                    up: site("mlp.up_proj", h, f, config.mlp_bias),
                },
                down: site("mlp.down_proj", f, h, config.mlp_bias),
            }
        })
        .collect();
    // Some tied checkpoints still carry a copy of the head; tying decides.
    let lm_head = (!config.tie_word_embeddings).then(|| SiteSpec {
        name: "lm_head".into(),
        in_features: h,
        out_features: config.vocab_size,
        bias: false,
        layer: None,
    });
    Ok(Plan {
        spec,
        embed: "model.embed_tokens.weight".into(),
        blocks,
        final_norm: "model.norm".into(),
        lm_head,
    })
}
