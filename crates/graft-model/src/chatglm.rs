//! ChatGLM2/3 (THUDM's modeling_chatglm.py): multi-query groups, rotary embedding on the
//! first half of each head in interleaved pairs, RMSNorm, SwiGLU, a bias on the fused
//! query_key_value only. ChatGLM2 and ChatGLM3 differ only in `seq_length`. Sites are named like
//! its module paths (`transformer.encoder.layers.5.self_attention.query_key_value`).
//!
//! THUDM's code keeps activations sequence-first (`[seq, batch, ...]`); graft keeps them
//! batch-first like every other architecture, which changes no value.
use crate::decoder::{Block, Decoder, DecoderSpec, GateUp, Qkv, RopeSpec};
use crate::layers::{Linear, Param, RmsNorm};
use crate::weights::Weights;
use crate::{Error, Result};
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
            },
            max_positions: self.seq_length,
            // THUDM's P-tuning v2 passes the prefix as past keys but numbers the real tokens
            // from 0.
            prefix_shifts_positions: false,
        }
    }
}

/// Builds the decoder from checkpoint tensors named as THUDM names them.
pub fn load(config: &Config, weights: &Weights, config_json: serde_json::Value) -> Result<Decoder> {
    config.validate()?;
    let spec = config.spec();
    let h = config.hidden_size;
    let d = spec.head_dim;
    let qkv_width = (spec.num_heads + 2 * spec.num_kv_heads) * d;
    let eps = config.layernorm_epsilon;
    let embed = Param::load(
        weights,
        "transformer.embedding.word_embeddings.weight",
        &[config.padded_vocab_size, h],
    )?;
    let mut blocks = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let p = format!("transformer.encoder.layers.{i}");
        let site = |name: &str, inp: usize, out: usize, bias: bool| {
            Linear::load(weights, &format!("{p}.{name}"), inp, out, bias, Some(i))
        };
        let norm = |name: &str| RmsNorm::load(weights, &format!("{p}.{name}"), h, eps);
        blocks.push(Block {
            input_norm: norm("input_layernorm")?,
            qkv: Qkv::Fused(site(
                "self_attention.query_key_value",
                h,
                qkv_width,
                config.add_qkv_bias,
            )?),
            attention_out: site("self_attention.dense", spec.num_heads * d, h, false)?,
            post_attention_norm: norm("post_attention_layernorm")?,
            gate_up: GateUp::Fused(site(
                "mlp.dense_h_to_4h",
                h,
                2 * config.ffn_hidden_size,
                false,
            )?),
            down: site("mlp.dense_4h_to_h", config.ffn_hidden_size, h, false)?,
        });
    }
    let final_norm = RmsNorm::load(weights, "transformer.encoder.final_layernorm", h, eps)?;
    let lm_head = Linear::load(
        weights,
        "transformer.output_layer",
        h,
        config.padded_vocab_size,
        false,
        None,
    )?;
    Decoder::new(spec, embed, blocks, final_norm, Some(lm_head), config_json)
}

/// Writes a ChatGLM model folder (config.json, model.safetensors) with random weights of
/// `config`'s shapes: small real-shaped models for tests, where no small pretrained ChatGLM
/// exists. Norm weights are near 1, projections normal(0, 0.2), embeddings normal(0, 1).
pub fn write_random(dir: &std::path::Path, config: &Config, seed: u64) -> Result<()> {
    use candle_core::{DType, Device};
    config.validate()?;
    let spec = config.spec();
    let (h, f, v) = (
        config.hidden_size,
        config.ffn_hidden_size,
        config.padded_vocab_size,
    );
    let qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim;
    let mut rng = crate::init::seeded_rng(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: &[usize], std: f64, mean: f64| -> Result<()> {
        let t = (crate::init::normal(&mut rng, shape, std, DType::F32, &Device::Cpu)? + mean)?;
        tensors.push((name, t));
        Ok(())
    };
    add(
        "transformer.embedding.word_embeddings.weight".into(),
        &[v, h],
        1.0,
        0.0,
    )?;
    for i in 0..config.num_layers {
        let p = format!("transformer.encoder.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[h], 0.1, 1.0)?;
        add(
            format!("{p}.self_attention.query_key_value.weight"),
            &[qkv, h],
            0.2,
            0.0,
        )?;
        if config.add_qkv_bias {
            add(
                format!("{p}.self_attention.query_key_value.bias"),
                &[qkv],
                0.2,
                0.0,
            )?;
        }
        add(
            format!("{p}.self_attention.dense.weight"),
            &[h, spec.num_heads * spec.head_dim],
            0.2,
            0.0,
        )?;
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            0.1,
            1.0,
        )?;
        add(
            format!("{p}.mlp.dense_h_to_4h.weight"),
            &[2 * f, h],
            0.2,
            0.0,
        )?;
        add(format!("{p}.mlp.dense_4h_to_h.weight"), &[h, f], 0.2, 0.0)?;
    }
    add(
        "transformer.encoder.final_layernorm.weight".into(),
        &[h],
        0.1,
        1.0,
    )?;
    add("transformer.output_layer.weight".into(), &[v, h], 0.2, 0.0)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    crate::weights::save_safetensors(tensors, &dir.join("model.safetensors"))?;
    let json = serde_json::to_value(config).map_err(|source| Error::Config {
        path: dir.join("config.json"),
        source,
    })?;
    crate::weights::save_json(&json, &dir.join("config.json"))
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
