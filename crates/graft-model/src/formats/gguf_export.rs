//! Writing a Llama-family decoder as a GGUF file that llama.cpp (and Ollama) run: llama.cpp's
//! metadata keys and tensor names, Q and K rows permuted for its interleaved rotary form (the
//! inverse of what `gguf.rs` undoes when reading, so graft reads its own export back to the same
//! model), norms in f32, every other tensor in f16 or quantized, the tokenizer and chat template
//! in the `tokenizer.*` keys.
use crate::decoder::{Decoder, DecoderSpec};
use crate::error::{Error, Result};
use crate::formats::gguf;
use crate::hooks::Hooks;
use crate::quant::Quantization;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The type a GGUF file's matrices take (`graft export --gguf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F16,
    /// Blocks of a graft quantization family; a matrix whose rows no block of the family
    /// divides falls back as llama.cpp's quantizer does (q4_k to q5_0, then f16).
    Quantized(Quantization),
}

impl GgufType {
    pub const NAMES: [&'static str; 3] = ["f16", "q8_0", "q4_k"];

    /// llama.cpp's `general.file_type` (its `llama_ftype`): mostly f16, q8_0, q4_k_s.
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Quantized(Quantization::Q8_0) => 7,
            Self::Quantized(Quantization::Q4K) => 14,
        }
    }

    /// The format of a matrix whose rows are `width` wide.
    fn format_for(self, width: usize) -> GgmlDType {
        match self {
            Self::F16 => GgmlDType::F16,
            Self::Quantized(family) => family.format_for(width).unwrap_or(GgmlDType::F16),
        }
    }
}

impl std::str::FromStr for GgufType {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "f16" => Ok(Self::F16),
            other => other.parse().map(Self::Quantized).map_err(|_| {
                Error::InvalidConfig(format!(
                    "GGUF type `{other}`: expected one of {}",
                    Self::NAMES.join(", ")
                ))
            }),
        }
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::F16 => f.write_str("f16"),
            Self::Quantized(family) => family.fmt(f),
        }
    }
}

/// The config.json `model_type`s written, all as llama.cpp's `llama` architecture.
pub const EXPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral"];

/// llama.cpp's `general.architecture` of every file written (a model, or an adapter to one).
pub(crate) const ARCHITECTURE: &str = "llama";

/// The `tokenizer.*` metadata of a GGUF file: vocabulary, merges or scores, special token ids,
/// chat template.
#[derive(Debug, Clone)]
pub struct TokenizerMetadata(Vec<(String, Value)>);

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

impl TokenizerMetadata {
    /// The `tokenizer.*` keys of a GGUF file, as they are.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let mut file = gguf::open(path)?;
        let content = gguf::read_content(path, &mut file)?;
        let mut keys: Vec<(String, Value)> = content
            .metadata
            .into_iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        let metadata = Self(keys);
        metadata.token_count().ok_or_else(|| Error::Weights {
            path: path.to_path_buf(),
            reason: "metadata `tokenizer.ggml.tokens` is missing".into(),
        })?;
        Ok(metadata)
    }

    /// From a Hugging Face `tokenizer.json` (and the `tokenizer_config.json` beside it, for
    /// special tokens, `add_bos_token` and the chat template). SentencePiece-style BPE (byte
    /// fallback, `▁` for spaces, as Llama 2's) becomes llama.cpp's `llama` model, a merge's
    /// result scoring minus its rank so that merges apply in the same order. Byte-level BPE is
    /// refused: llama.cpp picks its pre-tokenizer by a name its converter derives from a hash
    /// of the tokenizer's output, which graft cannot name reliably.
    pub fn from_folder(tokenizer_json: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Export {
            path: tokenizer_json.to_path_buf(),
            reason,
        };
        let json = read_json(tokenizer_json)?;
        let model = &json["model"];
        let spm_style = model["type"] == "BPE"
            && model["byte_fallback"] == true
            && json["normalizer"].to_string().contains('▁');
        if !spm_style {
            return Err(bad(format!(
                "only SentencePiece-style BPE tokenizers (byte fallback, `▁` for spaces) are \
                 exported from a model folder; this one is {} with pre-tokenizer {}. Export \
                 from the model's GGUF file, whose tokenizer metadata is copied",
                model["type"], json["pre_tokenizer"]
            )));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("model.vocab is not an object".into()))?;
        let added: Vec<&serde_json::Value> = json["added_tokens"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let mut by_id: BTreeMap<u64, (String, i32)> = BTreeMap::new();
        for (token, id) in vocab {
            let id = id
                .as_u64()
                .ok_or_else(|| bad(format!("token `{token}` has id {id}")))?;
            let is_byte = token.len() == 6 && token.starts_with("<0x") && token.ends_with('>');
            by_id.insert(id, (token.clone(), if is_byte { BYTE } else { NORMAL }));
        }
        for a in &added {
            let (Some(id), Some(token)) = (a["id"].as_u64(), a["content"].as_str()) else {
                return Err(bad(format!("added token {a} lacks an id or content")));
            };
            let kind = if a["special"] == true {
                CONTROL
            } else {
                USER_DEFINED
            };
            by_id.insert(id, (token.to_string(), kind));
        }
        let count = by_id.len();
        if by_id
            .keys()
            .last()
            .is_some_and(|&last| last + 1 != count as u64)
        {
            return Err(bad(format!("token ids are not 0..{count}")));
        }
        let index: BTreeMap<&str, usize> = by_id
            .values()
            .enumerate()
            .map(|(i, (t, _))| (t.as_str(), i))
            .collect();
        let mut scores = vec![0f32; count];
        let merges = model["merges"].as_array().cloned().unwrap_or_default();
        for (rank, merge) in merges.iter().enumerate() {
            // Merges are "a b" strings or ["a", "b"] pairs, by the tokenizers version.
            let joined = match merge {
                serde_json::Value::String(s) => s.replacen(' ', "", 1),
                serde_json::Value::Array(p) => p.iter().filter_map(|x| x.as_str()).collect(),
                other => return Err(bad(format!("merge {other} is neither a string nor a pair"))),
            };
            if let Some(&i) = index.get(joined.as_str()) {
                scores[i] = -(rank as f32) - 1.0;
            }
        }
        let config_path = tokenizer_json.with_file_name("tokenizer_config.json");
        let config = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            serde_json::Value::Null
        };
        let unk = model["unk_token"].as_str().or(config["unk_token"].as_str());
        let mut types: Vec<i32> = by_id.values().map(|(_, kind)| *kind).collect();
        if let Some(&i) = unk.and_then(|u| index.get(u)) {
            types[i] = UNKNOWN;
        }
        let mut keys = vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.pre", Value::String("default".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(
                    by_id
                        .values()
                        .map(|(t, _)| Value::String(t.clone()))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.add_bos_token",
                Value::Bool(config["add_bos_token"].as_bool().unwrap_or(true)),
            ),
            (
                "tokenizer.ggml.add_eos_token",
                Value::Bool(config["add_eos_token"].as_bool().unwrap_or(false)),
            ),
        ];
        let special = [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
        ];
        for (field, key) in special {
            // A token is a string, or an object with its `content` (older transformers).
            let token = config[field]
                .as_str()
                .or(config[field]["content"].as_str())
                .or(if field == "unk_token" { unk } else { None });
            if let Some(&i) = token.and_then(|t| index.get(t)) {
                keys.push((key, Value::U32(i as u32)));
            }
        }
        if let Some(template) = config["chat_template"].as_str() {
            keys.push(("tokenizer.chat_template", Value::String(template.into())));
        }
        Ok(Self(
            keys.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        ))
    }

    /// How many tokens the vocabulary holds.
    pub fn token_count(&self) -> Option<usize> {
        self.get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(Vec::len)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// What [`write_llama`] wrote: the tensors by GGUF type, and the file's size.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub formats: BTreeMap<String, usize>,
    pub bytes: u64,
}

/// Writes `decoder`, its tensors as `hooks` resolve them (a merged adapter, full fine-tuning's
/// tensors), to `path` as a GGUF file of llama.cpp's `llama` architecture named `name`, its
/// matrices in `ty`, with `tokenizer`'s metadata. Written to a sibling file, then renamed.
pub fn write_llama(
    decoder: &Decoder,
    hooks: &dyn Hooks,
    tokenizer: &TokenizerMetadata,
    name: &str,
    ty: GgufType,
    path: &Path,
) -> Result<Written> {
    let bad = |reason: String| Error::Export {
        path: path.to_path_buf(),
        reason,
    };
    let spec = decoder.spec();
    check_architecture(spec).map_err(bad)?;
    match tokenizer.token_count() {
        Some(n) if n == spec.vocab_size => {}
        n => {
            return Err(bad(format!(
                "the tokenizer has {} tokens and the embedding table {} rows; llama.cpp needs \
                 one row per token",
                n.unwrap_or(0),
                spec.vocab_size
            )))
        }
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut formats = BTreeMap::new();
    for (key, tensor) in decoder.resolved_tensors(hooks, "exported")? {
        let gguf_name = gguf::llama_cpp_name(&key)
            .filter(|n| n.ends_with(".weight"))
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{key}` has no llama.cpp counterpart (biases are not exported)"
                ))
            })?;
        let tensor = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let tensor = llama_cpp_rows(&key, tensor, spec)?;
        let format = match tensor.dims() {
            [_, width] => ty.format_for(*width),
            _ => GgmlDType::F32,
        };
        *formats
            .entry(crate::quant::format_name(format))
            .or_insert(0) += 1;
        tensors.push((gguf_name, QTensor::quantize(&tensor, format)?));
    }
    if let Some(factors) = rope_factors(spec) {
        let n = factors.len();
        let factors = Tensor::from_vec(factors, n, &Device::Cpu)?;
        *formats.entry("f32".into()).or_insert(0) += 1;
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&factors, GgmlDType::F32)?,
        ));
    }
    let metadata = llama_metadata(spec, name, ty, tokenizer);
    let bytes = write_gguf(path, &metadata, &tensors)?;
    Ok(Written { formats, bytes })
}

/// Why llama.cpp's `llama` architecture cannot run `spec`, if it cannot.
pub(crate) fn check_architecture(spec: &DecoderSpec) -> std::result::Result<(), String> {
    if !EXPORTED_MODEL_TYPES.contains(&spec.model_type.as_str()) {
        return Err(format!(
            "model_type `{}` is not exported; GGUF export supports {} (llama.cpp's `{ARCHITECTURE}` \
             architecture)",
            spec.model_type,
            EXPORTED_MODEL_TYPES.join(", ")
        ));
    }
    if spec.rope.interleaved || spec.rope.rotary_dims != spec.head_dim {
        return Err("the rotary embedding is not Llama's (whole heads, rotate_half)".into());
    }
    Ok(())
}

/// The rows of the tensor `key` (a checkpoint key, `[out, ..]`) in llama.cpp's order: Q and K
/// permuted for its interleaved rotary form, every other tensor as it is. A LoRA adapter's B
/// (`[out, r]`) takes the same permutation as the weight it updates.
pub(crate) fn llama_cpp_rows(key: &str, tensor: Tensor, spec: &DecoderSpec) -> Result<Tensor> {
    if key.ends_with("self_attn.q_proj.weight") {
        gguf::permute(&tensor, spec.num_heads)
    } else if key.ends_with("self_attn.k_proj.weight") {
        gguf::permute(&tensor, spec.num_kv_heads)
    } else {
        Ok(tensor)
    }
}

/// Writes a GGUF file of `metadata` and `tensors` to a sibling file, then renames it to
/// `path`, so that a failed write leaves nothing under that name; returns the file's size.
pub(crate) fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<u64> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io(&partial))?);
    let result = candle_core::quantized::gguf_file::write(
        &mut file,
        &metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect::<Vec<_>>(),
        &tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t))
            .collect::<Vec<_>>(),
    )
    .map_err(Error::from)
    .and_then(|()| {
        use std::io::Write;
        file.flush().map_err(io(&partial))
    })
    .and_then(|()| std::fs::rename(&partial, path).map_err(io(path)));
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result?;
    Ok(std::fs::metadata(path).map_err(io(path))?.len())
}

/// llama.cpp's `general.*` and `llama.*` keys for `spec`, then the tokenizer's.
fn llama_metadata(
    spec: &DecoderSpec,
    name: &str,
    ty: GgufType,
    tokenizer: &TokenizerMetadata,
) -> Vec<(String, Value)> {
    let u32_of = |n: usize| Value::U32(n as u32);
    let mut keys = vec![
        (
            "general.architecture".to_string(),
            Value::String(ARCHITECTURE.into()),
        ),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
    ];
    if matches!(ty, GgufType::Quantized(_)) {
        keys.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let mut llama = vec![
        ("context_length", u32_of(spec.max_positions)),
        ("embedding_length", u32_of(spec.hidden_size)),
        ("block_count", u32_of(spec.num_layers)),
        ("feed_forward_length", u32_of(spec.intermediate_size)),
        ("attention.head_count", u32_of(spec.num_heads)),
        ("attention.head_count_kv", u32_of(spec.num_kv_heads)),
        ("rope.freq_base", Value::F32(spec.rope.theta as f32)),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(spec.rms_norm_eps as f32),
        ),
        ("rope.dimension_count", u32_of(spec.rope.rotary_dims)),
        ("vocab_size", u32_of(spec.vocab_size)),
    ];
    if spec.head_dim * spec.num_heads != spec.hidden_size {
        llama.push(("attention.key_length", u32_of(spec.head_dim)));
        llama.push(("attention.value_length", u32_of(spec.head_dim)));
    }
    keys.extend(llama.into_iter().map(|(k, v)| (format!("llama.{k}"), v)));
    keys.extend(tokenizer.0.iter().cloned());
    keys
}

/// Llama 3.1's rope scaling as llama.cpp takes it: a `rope_freqs` tensor holding, for each
/// rotary frequency, the factor it is divided by.
fn rope_factors(spec: &DecoderSpec) -> Option<Vec<f32>> {
    let scaling = spec.rope.llama3?;
    Some(
        spec.rope
            .inv_freq()
            .into_iter()
            .map(|f| f / scaling.apply(f))
            .collect(),
    )
}
