//! Llama-family models from GGUF files (llama.cpp's format), dequantised to a float dtype and
//! renamed to transformers' checkpoint names, so that they load, train and save like a Hugging
//! Face folder.
//!
//! llama.cpp's converter permutes the rows of Q and K for ggml's interleaved rotary embedding;
//! graft undoes it here so that every Llama runs transformers' rotate_half form.
use crate::error::{Error, Result};
use crate::models::llama::Config;
use crate::weights::{Quantizing, Weights};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The config of a Llama-family GGUF file, and a config.json equivalent, from its metadata.
pub fn read_llama_config(path: &Path) -> Result<(Config, serde_json::Value)> {
    let mut file = open(path)?;
    let content = read_content(path, &mut file)?;
    config_of(path, &content)
}

/// The weights of a Llama-family GGUF file (its config comes from [`read_llama_config`]); the
/// tensors `quantizing` names are quantized again in its family (from the file's dequantized
/// values), one by one.
pub fn load_llama(
    path: &Path,
    dtype: DType,
    device: &Device,
    quantizing: Option<&Quantizing>,
) -> Result<Weights> {
    let mut file = open(path)?;
    let content = read_content(path, &mut file)?;
    let (config, _) = config_of(path, &content)?;
    let bad = |reason: String| Error::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let heads = config.num_attention_heads;
    let kv_heads = config.num_kv_heads();
    let (mut tensors, mut quantized) = (HashMap::new(), HashMap::new());
    for name in content.tensor_infos.keys() {
        let Some(hf_name) = transformers_name(name) else {
            continue;
        };
        let q = content
            .tensor(&mut file, name, device)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let mut tensor = q
            .dequantize(device)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        if name.ends_with("attn_q.weight") {
            tensor = unpermute(&tensor, heads)?;
        } else if name.ends_with("attn_k.weight") {
            tensor = unpermute(&tensor, kv_heads)?;
        }
        // Converted one by one, so that the whole model is never held in f32 at once.
        if let Some(q) = quantizing {
            if let Some(blocks) = q.apply(&hf_name, &tensor, dtype, device)? {
                quantized.insert(hf_name, blocks);
                continue;
            }
        }
        tensors.insert(hf_name, tensor.to_dtype(dtype)?);
    }
    Weights::from_parts(path, tensors, quantized, dtype)
}

pub(crate) fn open(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn read_content(path: &Path, file: &mut std::fs::File) -> Result<Content> {
    Content::read(file).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: format!("not a GGUF file: {e}"),
    })
}

fn config_of(path: &Path, content: &Content) -> Result<(Config, serde_json::Value)> {
    let bad = |reason: String| Error::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let meta = |key: &str| -> Result<&Value> {
        content
            .metadata
            .get(key)
            .ok_or_else(|| bad(format!("metadata `{key}` is missing")))
    };
    let architecture = meta("general.architecture")?
        .to_string()
        .map_err(|e| bad(e.to_string()))?
        .clone();
    if architecture != "llama" {
        return Err(bad(format!(
            "general.architecture is `{architecture}`; graft reads llama GGUF files"
        )));
    }
    let int = |key: &str| -> Result<usize> {
        let v = meta(&format!("llama.{key}"))?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| bad(format!("llama.{key}: {e}")))
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match content.metadata.get(&format!("llama.{key}")) {
            Some(v) => v
                .to_f32()
                .map(f64::from)
                .map_err(|e| bad(format!("llama.{key}: {e}"))),
            None => Ok(default),
        }
    };
    let heads = int("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
    let token_embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| bad("tensor `token_embd.weight` is missing".into()))?;
    let vocab_size = *token_embd
        .shape
        .dims()
        .first()
        .ok_or_else(|| bad("tensor `token_embd.weight` has no dimensions".into()))?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(bad(
            "tensor `rope_freqs.weight` (rope scaling, as Llama 3.1's) is not read by graft: \
             positions would silently differ"
                .into(),
        ));
    }
    // Set where heads are not embedding_length / head_count wide.
    let head_dim = int("attention.key_length").ok();
    let config_json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": int("embedding_length")?,
        "intermediate_size": int("feed_forward_length")?,
        "num_hidden_layers": int("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon", 1e-5)?,
        "rope_theta": float("rope.freq_base", 10_000.0)?,
        "max_position_embeddings": int("context_length")?,
        "tie_word_embeddings": tied,
    });
    let config: Config = serde_json::from_value(config_json.clone())
        .map_err(|e| bad(format!("metadata does not make a Llama config: {e}")))?;
    config.validate()?;
    Ok((config, config_json))
}

/// llama.cpp's names of the model-wide tensors and transformers' for them.
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp's names of a block's modules (`blk.N.<name>`) and transformers' for them
/// (`model.layers.N.<name>`).
const BLOCK_MODULES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// transformers' name of a llama.cpp tensor, `None` for tensors graft does not use.
fn transformers_name(name: &str) -> Option<String> {
    rename(name, "blk.", "model.layers.", |(gguf, hf)| (gguf, hf))
}

/// llama.cpp's name of a transformers tensor of the Llama family, `None` for a name it has
/// no tensor for.
pub(crate) fn llama_cpp_name(name: &str) -> Option<String> {
    rename(name, "model.layers.", "blk.", |(gguf, hf)| (hf, gguf))
}

/// `name` in the other naming, reading the tables as `(from, to)` pairs through `pick`.
fn rename(
    name: &str,
    block_from: &str,
    block_to: &str,
    pick: fn((&'static str, &'static str)) -> (&'static str, &'static str),
) -> Option<String> {
    if let Some((_, to)) = MODEL_TENSORS
        .into_iter()
        .map(pick)
        .find(|(from, _)| *from == name)
    {
        return Some(to.to_string());
    }
    let rest = name.strip_prefix(block_from)?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = module.rsplit_once('.')?;
    let (_, to) = BLOCK_MODULES
        .into_iter()
        .map(pick)
        .find(|(from, _)| *from == module)?;
    Some(format!("{block_to}{layer}.{to}.{kind}"))
}

/// Undoes llama.cpp's permutation of Q/K rows `[heads * head_dim, in]`: within each head,
/// ggml stores rows as pairs (i, i + half) interleaved; transformers keeps the halves apart.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let half = w.dim(0)? / heads / 2;
    regroup(w, heads, (half, 2))
}

/// llama.cpp's permutation of Q/K rows (what its converter does, and [`unpermute`] undoes):
/// within each head, row i of the first half and row i of the second become neighbours.
pub(crate) fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let half = w.dim(0)? / heads / 2;
    regroup(w, heads, (2, half))
}

/// Rows of each head read as a `[a, b]` grid and written out transposed, `[b, a]`.
fn regroup(w: &Tensor, heads: usize, (a, b): (usize, usize)) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, a, b, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}
