//! Writing a Llama-family decoder as a GGUF file that llama.cpp (and Ollama) run: llama.cpp's
//! metadata keys and tensor names, Q and K rows permuted for its interleaved rotary form (the
//! inverse of what `gguf.rs` undoes when reading, so graft reads its own export back to the same
//! model), norms in f32, every other tensor in f16 or quantized, the tokenizer and chat template
//! in the `tokenizer.*` keys.
use crate::decoder::{Decoder, DecoderSpec};
use crate::error::{Error, Result};
use crate::formats::{gguf, gguf_writer};
use crate::hooks::Hooks;
use crate::quant::Quantization;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

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

/// The config.json `model_type`s written: Llama and Mistral as llama.cpp's `llama`, Qwen2 and
/// ChatGLM2/3 as its `qwen2` and `chatglm`.
pub const EXPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "chatglm"];

/// The `tokenizer.*` metadata of a GGUF file: vocabulary, merges or scores, special token ids,
/// chat template.
#[derive(Debug, Clone)]
pub struct TokenizerMetadata(Vec<(String, Value)>);

/// A SentencePiece vocabulary (`tokenizer.model`) as llama.cpp's `llama` tokenizer takes it:
/// every token in id order with its score and type, the special ids, whether a BOS and a space
/// go before a text.
#[derive(Debug, Clone)]
pub struct SentencePieceVocab {
    pub tokens: Vec<SentencePieceToken>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SentencePieceToken {
    pub text: String,
    pub score: f32,
    pub kind: TokenKind,
}

/// SentencePiece's piece types, which are llama.cpp's token types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn llama_cpp(self) -> i32 {
        match self {
            Self::Normal => NORMAL,
            Self::Unknown => UNKNOWN,
            Self::Control => CONTROL,
            Self::UserDefined => USER_DEFINED,
            Self::Unused => UNUSED,
            Self::Byte => BYTE,
        }
    }
}

/// ChatGLM3's chat format, which llama.cpp recognises by its `[gMASK]sop` and applies itself.
pub const CHATGLM3_TEMPLATE: &str = "[gMASK]sop{% for message in messages %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
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

    /// From a SentencePiece vocabulary, as llama.cpp's `llama` tokenizer.
    pub fn from_sentencepiece(vocab: SentencePieceVocab) -> Self {
        let mut keys = vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.pre", Value::String("default".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(
                    vocab
                        .tokens
                        .iter()
                        .map(|t| Value::String(t.text.clone()))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(vocab.tokens.iter().map(|t| Value::F32(t.score)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(
                    vocab
                        .tokens
                        .iter()
                        .map(|t| Value::I32(t.kind.llama_cpp()))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.add_bos_token", Value::Bool(vocab.add_bos)),
            ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
            (
                "tokenizer.ggml.add_space_prefix",
                Value::Bool(vocab.add_space_prefix),
            ),
        ];
        let ids = [
            ("tokenizer.ggml.bos_token_id", vocab.bos),
            ("tokenizer.ggml.eos_token_id", vocab.eos),
            ("tokenizer.ggml.unknown_token_id", vocab.unk),
        ];
        keys.extend(
            ids.into_iter()
                .filter_map(|(k, id)| Some((k, Value::U32(id?)))),
        );
        if let Some(template) = vocab.chat_template {
            keys.push(("tokenizer.chat_template", Value::String(template)));
        }
        Self(keys.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    /// From a Hugging Face `tokenizer.json` (and the `tokenizer_config.json` beside it, for
    /// special tokens, `add_bos_token` and the chat template). SentencePiece-style BPE (byte
    /// fallback, `▁` for spaces, as Llama 2's) becomes llama.cpp's `llama` model, a merge's
    /// result scoring minus its rank so that merges apply in the same order. Byte-level BPE
    /// whose pre-tokenizer splits with Qwen2's pattern becomes llama.cpp's `gpt2` model with
    /// the `qwen2` pre-tokenizer, merges as they are. Other byte-level BPE is refused: llama.cpp
    /// picks its pre-tokenizer by a name its converter derives from a hash of the tokenizer's
    /// output, which graft cannot name reliably.
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
        let qwen2_style = model["type"] == "BPE" && splits_as_qwen2(&json["pre_tokenizer"]);
        if !spm_style && !qwen2_style {
            return Err(bad(format!(
                "only SentencePiece-style BPE tokenizers (byte fallback, `▁` for spaces) and \
                 byte-level BPE with Qwen2's pre-tokenizer are exported from a model folder; \
                 this one is {} with pre-tokenizer {}. Export from the model's GGUF file, whose \
                 tokenizer metadata is copied",
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
            let is_byte =
                spm_style && token.len() == 6 && token.starts_with("<0x") && token.ends_with('>');
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
        let mut merges = Vec::new();
        for merge in model["merges"].as_array().into_iter().flatten() {
            // Merges are "a b" strings or ["a", "b"] pairs, by the tokenizers version.
            let pair = match merge {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(p) => p
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                other => return Err(bad(format!("merge {other} is neither a string nor a pair"))),
            };
            merges.push(pair);
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
        let tokens = Value::Array(
            by_id
                .values()
                .map(|(t, _)| Value::String(t.clone()))
                .collect(),
        );
        let mut keys = if spm_style {
            let mut scores = vec![0f32; count];
            for (rank, pair) in merges.iter().enumerate() {
                if let Some(&i) = index.get(pair.replacen(' ', "", 1).as_str()) {
                    scores[i] = -(rank as f32) - 1.0;
                }
            }
            vec![
                ("tokenizer.ggml.model", Value::String("llama".into())),
                ("tokenizer.ggml.pre", Value::String("default".into())),
                ("tokenizer.ggml.tokens", tokens),
                (
                    "tokenizer.ggml.scores",
                    Value::Array(scores.into_iter().map(Value::F32).collect()),
                ),
            ]
        } else {
            vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.pre", Value::String("qwen2".into())),
                ("tokenizer.ggml.tokens", tokens),
                (
                    "tokenizer.ggml.merges",
                    Value::Array(merges.into_iter().map(Value::String).collect()),
                ),
            ]
        };
        keys.extend([
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.add_bos_token",
                // Byte-level BPE models (Qwen2) put no BOS unless their config says so.
                Value::Bool(config["add_bos_token"].as_bool().unwrap_or(spm_style)),
            ),
            (
                "tokenizer.ggml.add_eos_token",
                Value::Bool(config["add_eos_token"].as_bool().unwrap_or(false)),
            ),
        ]);
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

    /// This vocabulary with `[PAD{id}]` tokens (unused) appended up to `rows` tokens, as
    /// llama.cpp's converter pads a vocabulary to the embedding table (ChatGLM's
    /// `padded_vocab_size`, Qwen2's `vocab_size`): llama.cpp needs one token per row.
    fn padded_to(&self, rows: usize) -> std::result::Result<Self, String> {
        let count = self.token_count().unwrap_or(0);
        if count > rows {
            return Err(format!(
                "the tokenizer has {count} tokens and the embedding table {rows} rows; \
                 llama.cpp needs one row per token"
            ));
        }
        let pad = |key: &str, id: usize| match key {
            "tokenizer.ggml.tokens" => Some(Value::String(format!("[PAD{id}]"))),
            "tokenizer.ggml.token_type" => Some(Value::I32(UNUSED)),
            "tokenizer.ggml.scores" => Some(Value::F32(0.0)),
            _ => None,
        };
        let keys = self
            .0
            .iter()
            .map(|(key, value)| {
                let mut value = value.clone();
                if let Value::Array(items) = &mut value {
                    items.extend((count..rows).map_while(|id| pad(key, id)));
                }
                (key.clone(), value)
            })
            .collect();
        Ok(Self(keys))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Qwen2's pre-tokenizer pattern in its tokenizer.json, which llama.cpp's `qwen2`
/// pre-tokenizer applies.
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Whether a tokenizer.json `pre_tokenizer` is Qwen2's: a split by [`QWEN2_PATTERN`] (its
/// matches kept as pieces), then byte-level mapping without a regex of its own.
fn splits_as_qwen2(pre: &serde_json::Value) -> bool {
    let steps = pre["pretokenizers"].as_array().cloned().unwrap_or_default();
    matches!(steps.as_slice(), [split, bytes]
        if split["type"] == "Split"
            && split["pattern"]["Regex"] == QWEN2_PATTERN
            && split["behavior"] == "Isolated"
            && split["invert"] == false
            && bytes["type"] == "ByteLevel"
            && bytes["use_regex"] == false
            && bytes["add_prefix_space"] == false)
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

/// What [`write_gguf`] wrote: the tensors by GGUF type, and the file's size.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub formats: BTreeMap<String, usize>,
    pub bytes: u64,
}

/// The llama.cpp architecture a decoder is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    /// `llama`: Q and K rows permuted for its interleaved rotary form, no biases.
    Llama,
    /// `qwen2`: biases on q, k and v; rotate_half rotary (ggml's NEOX), so nothing permuted.
    Qwen2,
    /// `chatglm`: fused qkv (with its bias) and gate+up; ChatGLM's interleaved rotary on half
    /// of each head is ggml's NORM form already.
    ChatGlm,
}

impl Arch {
    /// The architecture `spec` is written as, or why llama.cpp cannot run it.
    pub(crate) fn for_spec(spec: &DecoderSpec) -> std::result::Result<Self, String> {
        let arch = Self::of(&spec.model_type).ok_or_else(|| {
            format!(
                "model_type `{}` is not exported; GGUF export supports {}",
                spec.model_type,
                EXPORTED_MODEL_TYPES.join(", ")
            )
        })?;
        match arch.refusal(spec) {
            Some(reason) => Err(reason),
            None => Ok(arch),
        }
    }

    fn of(model_type: &str) -> Option<Self> {
        if !EXPORTED_MODEL_TYPES.contains(&model_type) {
            return None;
        }
        match model_type {
            "llama" | "mistral" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "chatglm" => Some(Self::ChatGlm),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::ChatGlm => "chatglm",
        }
    }

    /// Why llama.cpp's graph for this architecture cannot run `spec`, if it cannot.
    fn refusal(self, spec: &DecoderSpec) -> Option<String> {
        let rope = &spec.rope;
        match self {
            Self::Llama | Self::Qwen2 if rope.interleaved || rope.rotary_dims != spec.head_dim => {
                Some("the rotary embedding is not Llama's (whole heads, rotate_half)".into())
            }
            Self::Qwen2 if rope.llama3.is_some() => {
                Some("llama.cpp's qwen2 has no Llama 3.1 rope scaling".into())
            }
            // llama.cpp's qwen2 projects queries to the embedding width.
            Self::Qwen2 if spec.num_heads * spec.head_dim != spec.hidden_size => Some(format!(
                "llama.cpp's qwen2 needs heads x head_dim = hidden_size; this one has {} x {} \
                 and {}",
                spec.num_heads, spec.head_dim, spec.hidden_size
            )),
            Self::ChatGlm if !rope.interleaved => {
                Some("a ChatGLM whose rotary pairs are not interleaved".into())
            }
            // llama.cpp's chatglm slices the fused qkv output at the embedding width.
            Self::ChatGlm if spec.num_heads * spec.head_dim != spec.hidden_size => Some(format!(
                "llama.cpp's chatglm needs heads x kv_channels = hidden_size; this one has \
                 {} x {} and {}",
                spec.num_heads, spec.head_dim, spec.hidden_size
            )),
            _ => None,
        }
    }

    /// llama.cpp's name of the checkpoint tensor `key`, `None` where it has none.
    pub(crate) fn tensor_name(self, key: &str) -> Option<String> {
        match self {
            Self::Llama => gguf::llama_cpp_name(key).filter(|n| n.ends_with(".weight")),
            // Qwen2's only biases are those of q, k and v, which llama.cpp's qwen2 loads.
            Self::Qwen2 => gguf::llama_cpp_name(key).filter(|n| {
                n.ends_with(".weight")
                    || [".attn_q.bias", ".attn_k.bias", ".attn_v.bias"]
                        .iter()
                        .any(|b| n.ends_with(b))
            }),
            Self::ChatGlm => chatglm_name(key),
        }
    }

    /// How many heads the rows of `key` are permuted over, for llama.cpp's `llama` only.
    pub(crate) fn permuted_heads(self, key: &str, spec: &DecoderSpec) -> Option<usize> {
        if self != Self::Llama {
            return None;
        }
        if key.ends_with("self_attn.q_proj.weight") {
            Some(spec.num_heads)
        } else if key.ends_with("self_attn.k_proj.weight") {
            Some(spec.num_kv_heads)
        } else {
            None
        }
    }
}

/// THUDM's ChatGLM checkpoint tensors outside the blocks, by llama.cpp name.
const CHATGLM_MODEL_TENSORS: [(&str, &str); 3] = [
    (
        "token_embd.weight",
        "transformer.embedding.word_embeddings.weight",
    ),
    (
        "output_norm.weight",
        "transformer.encoder.final_layernorm.weight",
    ),
    ("output.weight", "transformer.output_layer.weight"),
];

/// ChatGLM's block modules (`transformer.encoder.layers.N.<name>`) by llama.cpp name
/// (`blk.N.<name>`): `ffn_up` holds the fused gate and up of `dense_h_to_4h`, gate first, as
/// llama.cpp's SwiGLU on one tensor splits it.
const CHATGLM_BLOCK_MODULES: [(&str, &str); 6] = [
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "self_attention.query_key_value"),
    ("attn_output", "self_attention.dense"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_up", "mlp.dense_h_to_4h"),
    ("ffn_down", "mlp.dense_4h_to_h"),
];

fn chatglm_name(key: &str) -> Option<String> {
    if let Some((gguf, _)) = CHATGLM_MODEL_TENSORS.iter().find(|(_, hf)| *hf == key) {
        return Some(gguf.to_string());
    }
    let (layer, module) = key
        .strip_prefix("transformer.encoder.layers.")?
        .split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = module.rsplit_once('.')?;
    let (gguf, _) = CHATGLM_BLOCK_MODULES.iter().find(|(_, hf)| *hf == module)?;
    // The fused qkv is the one projection with a bias llama.cpp's chatglm loads.
    (kind == "weight" || *gguf == "attn_qkv").then(|| format!("blk.{layer}.{gguf}.{kind}"))
}

/// Writes `decoder`, its tensors as `hooks` resolve them (a merged adapter, full fine-tuning's
/// tensors), to `path` as a GGUF file named `name` of llama.cpp's architecture for its
/// `model_type` (`llama` for Llama and Mistral, `qwen2`, `chatglm`), its matrices in `ty`, with
/// `tokenizer`'s metadata. The header is written first; then one tensor at a time is resolved,
/// converted and written, so that the export holds about one tensor besides the model. Written
/// to a sibling file, then renamed.
pub fn write_gguf(
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
    let arch = Arch::for_spec(spec).map_err(bad)?;
    if let Some((key, blocks)) = decoder.quantized().first() {
        return Err(Error::Quantized {
            key: key.to_string(),
            format: crate::quant::format_name(blocks.format()),
            what: "exported",
        });
    }
    let tokenizer = tokenizer.padded_to(spec.vocab_size).map_err(bad)?;
    let params = decoder.params();
    let mut infos = Vec::with_capacity(params.len() + 1);
    let mut formats = BTreeMap::new();
    for p in &params {
        let key = p.key();
        let gguf_name = arch.tensor_name(key).ok_or_else(|| {
            bad(format!(
                "tensor `{key}` has no counterpart in llama.cpp's `{}`",
                arch.name()
            ))
        })?;
        let dims = p.value().dims().to_vec();
        let format = match dims.as_slice() {
            [_, width] => ty.format_for(*width),
            _ => GgmlDType::F32,
        };
        *formats
            .entry(crate::quant::format_name(format))
            .or_insert(0) += 1;
        infos.push(gguf_writer::TensorInfo {
            name: gguf_name,
            dims,
            format,
        });
    }
    let factors = match arch {
        Arch::Llama => rope_factors(spec),
        Arch::Qwen2 | Arch::ChatGlm => None,
    };
    if let Some(factors) = &factors {
        *formats.entry("f32".into()).or_insert(0) += 1;
        infos.push(gguf_writer::TensorInfo {
            name: "rope_freqs.weight".into(),
            dims: vec![factors.len()],
            format: GgmlDType::F32,
        });
    }
    let metadata = metadata(arch, spec, name, ty, &tokenizer);
    let bytes = gguf_writer::write(path, &metadata, &infos, |i| {
        let Some(p) = params.get(i) else {
            let factors = factors.clone().unwrap_or_default();
            let n = factors.len();
            return Ok(QTensor::quantize(
                &Tensor::from_vec(factors, n, &Device::Cpu)?,
                GgmlDType::F32,
            )?);
        };
        let tensor = p
            .resolve(hooks)?
            .detach()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        let tensor = match arch.permuted_heads(p.key(), spec) {
            Some(heads) => gguf::permute(&tensor, heads)?,
            None => tensor,
        };
        Ok(QTensor::quantize(&tensor, infos[i].format)?)
    })?;
    Ok(Written { formats, bytes })
}

/// llama.cpp's `general.*` and `{arch}.*` keys for `spec`, then the tokenizer's.
fn metadata(
    arch: Arch,
    spec: &DecoderSpec,
    name: &str,
    ty: GgufType,
    tokenizer: &TokenizerMetadata,
) -> Vec<(String, Value)> {
    let u32_of = |n: usize| Value::U32(n as u32);
    let mut keys = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.name().into()),
        ),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
    ];
    if matches!(ty, GgufType::Quantized(_)) {
        keys.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let mut model = vec![
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
        // ChatGLM rotates half of each head; llama.cpp reads how much from this key.
        ("rope.dimension_count", u32_of(spec.rope.rotary_dims)),
        ("vocab_size", u32_of(spec.vocab_size)),
    ];
    if spec.head_dim * spec.num_heads != spec.hidden_size {
        model.push(("attention.key_length", u32_of(spec.head_dim)));
        model.push(("attention.value_length", u32_of(spec.head_dim)));
    }
    keys.extend(
        model
            .into_iter()
            .map(|(k, v)| (format!("{}.{k}", arch.name()), v)),
    );
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
