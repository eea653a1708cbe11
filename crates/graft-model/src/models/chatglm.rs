//! ChatGLM2/3 (THUDM's modeling_chatglm.py): multi-query groups, rotary embedding on the
//! first half of each head in interleaved pairs, RMSNorm, SwiGLU, a bias on the fused
//! query_key_value only. ChatGLM2 and ChatGLM3 differ only in `seq_length`. Sites are named like
//! its module paths (`transformer.encoder.layers.5.self_attention.query_key_value`).
//!
//! THUDM's code keeps activations sequence-first (`[seq, batch, ...]`); graft keeps them
//! batch-first like every other architecture, which changes no value.
use crate::decoder::{BlockPlan, DecoderSpec, GateUp, Plan, Qkv, RopeSpec, SiteSpec};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The fields of a ChatGLM2/3 config.json that the forward pass depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub num_layers: usize,
    pub padded_vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_hidden_size: usize,
    pub kv_channels: usize,
    pub num_attention_heads: usize,
    pub seq_length: usize,
    #[serde(default = "default_eps")]
    pub layernorm_epsilon: f64,
    #[serde(default = "yes")]
    pub rmsnorm: bool,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default = "yes")]
    pub post_layer_norm: bool,
    #[serde(default)]
    pub add_bias_linear: bool,
    #[serde(default = "yes")]
    pub add_qkv_bias: bool,
    #[serde(default = "yes")]
    pub multi_query_attention: bool,
    #[serde(default = "one")]
    pub multi_query_group_num: usize,
    /// Scales the rotary base (ChatGLM2/3's 32k variants); 1 elsewhere.
    #[serde(default = "one_f64")]
    pub rope_ratio: f64,
    /// P-tuning v2 prefix length of a checkpoint trained with THUDM's scripts.
    #[serde(default)]
    pub pre_seq_len: Option<usize>,
}

fn default_model_type() -> String {
    "chatglm".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        let unsupported = |what: &str| {
            Err(Error::InvalidConfig(format!(
                "ChatGLM with {what} is not supported (ChatGLM2/3 do not use it)"
            )))
        };
        if self.model_type != "chatglm" {
            return Err(Error::InvalidConfig(format!(
                "model_type `{}` is not chatglm",
                self.model_type
            )));
        }
        if !self.rmsnorm {
            return unsupported("rmsnorm: false");
        }
        if self.apply_residual_connection_post_layernorm {
            return unsupported("apply_residual_connection_post_layernorm: true");
        }
        if !self.post_layer_norm {
            return unsupported("post_layer_norm: false");
        }
        if self.add_bias_linear {
            return unsupported("add_bias_linear: true");
        }
        if self.num_attention_heads == 0 || self.kv_channels == 0 || self.kv_groups() == 0 {
            return Err(Error::InvalidConfig(format!(
                "{} heads of {} channels over {} groups",
                self.num_attention_heads,
                self.kv_channels,
                self.kv_groups()
            )));
        }
        Ok(())
    }

    /// Key/value heads: the multi-query groups, or one per head without multi-query attention.
    pub fn kv_groups(&self) -> usize {
        if self.multi_query_attention {
            self.multi_query_group_num
        } else {
            self.num_attention_heads
        }
    }

    pub fn spec(&self) -> DecoderSpec {
        DecoderSpec {
            model_type: self.model_type.clone(),
            hidden_size: self.hidden_size,
            intermediate_size: self.ffn_hidden_size,
            num_layers: self.num_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.kv_groups(),
            head_dim: self.kv_channels,
            vocab_size: self.padded_vocab_size,
            rms_norm_eps: self.layernorm_epsilon,
            rope: RopeSpec {
                theta: 10_000.0 * self.rope_ratio,
                rotary_dims: self.kv_channels / 2,
                interleaved: true,
                llama3: None,
            },
            max_positions: self.seq_length,
            // THUDM's P-tuning v2 passes the prefix as past keys but numbers the real tokens
            // from 0.
            prefix_shifts_positions: false,
        }
    }
}

/// Every tensor of the checkpoint, named as THUDM names them.
pub fn plan(config: &Config) -> Result<Plan> {
    config.validate()?;
    let spec = config.spec();
    let (h, d, f) = (config.hidden_size, spec.head_dim, config.ffn_hidden_size);
    let qkv_width = (spec.num_heads + 2 * spec.num_kv_heads) * d;
    let blocks = (0..config.num_layers)
        .map(|i| {
            let p = format!("transformer.encoder.layers.{i}");
            let site = SiteSpec::in_layer(&p, i);
            BlockPlan {
                input_norm: format!("{p}.input_layernorm"),
                qkv: Qkv::Fused(site(
                    "self_attention.query_key_value",
                    h,
                    qkv_width,
                    config.add_qkv_bias,
                )),
                attention_out: site("self_attention.dense", spec.num_heads * d, h, false),
                post_attention_norm: format!("{p}.post_attention_layernorm"),
                gate_up: GateUp::Fused(site("mlp.dense_h_to_4h", h, 2 * f, false)),
                down: site("mlp.dense_4h_to_h", f, h, false),
            }
        })
        .collect();
    Ok(Plan {
        spec,
        embed: "transformer.embedding.word_embeddings.weight".into(),
        blocks,
        final_norm: "transformer.encoder.final_layernorm".into(),
        lm_head: Some(SiteSpec {
            name: "transformer.output_layer".into(),
            in_features: h,
            out_features: config.padded_vocab_size,
            bias: false,
            layer: None,
        }),
    })
}

/// Writes a ChatGLM model folder with random weights of `config`'s shapes: small real-shaped
/// models for tests, where no small pretrained ChatGLM exists.
pub fn write_random(dir: &std::path::Path, config: &Config, seed: u64) -> Result<()> {
    let json = serde_json::to_value(config).map_err(|source| Error::Config {
        path: dir.join("config.json"),
        source,
    })?;
    plan(config)?.write_random(dir, &json, seed)
}

impl Config {
    /// A small ChatGLM2-shaped config for tests: two layers, two multi-query groups.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            model_type: "chatglm".into(),
            num_layers: 2,
            padded_vocab_size: vocab_size,
            hidden_size: 32,
            ffn_hidden_size: 48,
            kv_channels: 8,
            num_attention_heads: 4,
            seq_length: 256,
            layernorm_epsilon: 1e-5,
            rmsnorm: true,
            apply_residual_connection_post_layernorm: false,
            post_layer_norm: true,
            add_bias_linear: false,
            add_qkv_bias: true,
            multi_query_attention: true,
            multi_query_group_num: 2,
            rope_ratio: 1.0,
            pre_seq_len: None,
        }
    }
}
