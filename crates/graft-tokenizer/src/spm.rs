//! SentencePiece `tokenizer.model` files, read without SentencePiece: the few fields of
//! `sentencepiece_model.proto` that encoding needs, then a `tokenizers::Tokenizer` built from
//! them the way Hugging Face transformers' `convert_slow_tokenizer` builds Llama's (BPE with byte
//! fallback, merges derived from the pieces and their scores, `▁` for spaces).
//!
//! The protobuf is read by hand: it is a handful of varint, fixed32 and length-delimited fields,
//! and the crates that read protobuf need either generated code or a `protoc` at build time.

use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as StripDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Precompiled, Prepend, Replace, Sequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PaddingParams, Tokenizer};

use crate::error::{Error, Result};

/// SentencePiece's word-boundary mark, which stands for a space inside pieces.
const SPACE_MARK: &str = "\u{2581}";

/// Tokens ChatGLM2 and ChatGLM3 put after the SentencePiece vocabulary, in id order (THUDM's
/// `SPTokenizer`): ChatGLM2 has the first five; ChatGLM3 adds the four role tokens. Both share
/// the same `tokenizer.model`, so the five common ones have the same ids in both.
pub const CHATGLM_SPECIAL_TOKENS: [&str; 9] = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
];

/// Which model family's conventions a SentencePiece model is read with: the special tokens it
/// adds after the vocabulary and what encoding puts around a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentencePieceFlavour {
    /// Llama's conventions (`LlamaTokenizer`): the BOS piece before every text (unless
    /// `add_bos_token` is false in `tokenizer_config.json`), the EOS piece after it if
    /// `add_eos_token` is true; padding with the model's pad piece, else its unknown piece.
    Plain { add_bos: bool, add_eos: bool },
    /// THUDM's `ChatGLMTokenizer` (ChatGLM2, ChatGLM3): [`CHATGLM_SPECIAL_TOKENS`] after the
    /// vocabulary, `[gMASK] sop` before every text, padding with the unknown piece. As in
    /// THUDM's tokenizer, these tokens are never matched in text: text that spells `sop` is
    /// encoded as text.
    ChatGlm,
}

impl SentencePieceFlavour {
    /// The flavour for the `.model` at `model_path`, from files beside it: `tokenizer_config.json`
    /// with `"tokenizer_class": "ChatGLMTokenizer"`, or else `config.json` with
    /// `"model_type": "chatglm"`, make it [`SentencePieceFlavour::ChatGlm`]; otherwise
    /// [`SentencePieceFlavour::Plain`] with `add_bos_token` / `add_eos_token` from
    /// `tokenizer_config.json` (Llama's defaults, true and false, where absent).
    pub fn detect(model_path: &Path) -> Result<Self> {
        let dir = model_path.parent().unwrap_or(Path::new("."));
        let tokenizer_config = read_json_object(&dir.join("tokenizer_config.json"))?;
        let config = read_json_object(&dir.join("config.json"))?;
        let str_field = |v: &Option<serde_json::Value>, key: &str| {
            v.as_ref()
                .and_then(|v| v.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let is_chatglm = str_field(&tokenizer_config, "tokenizer_class").as_deref()
            == Some("ChatGLMTokenizer")
            || str_field(&config, "model_type").as_deref() == Some("chatglm");
        if is_chatglm {
            return Ok(Self::ChatGlm);
        }
        let bool_field = |key: &str, default: bool| {
            tokenizer_config
                .as_ref()
                .and_then(|v| v.get(key))
                .and_then(|v| v.as_bool())
                .unwrap_or(default)
        };
        Ok(Self::Plain {
            add_bos: bool_field("add_bos_token", true),
            add_eos: bool_field("add_eos_token", false),
        })
    }
}

/// A JSON file beside the model, if there is one; a file that is there but unreadable or not a
/// JSON object is an error rather than silently ignored.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadTokenizer {
        path: path.to_path_buf(),
        source,
    })?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(value) if value.is_object() => Ok(Some(value)),
        Ok(_) => Err(Error::TokenizerConfig {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        }),
        Err(e) => Err(Error::TokenizerConfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

/// `SentencePiece.Type` in `sentencepiece_model.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(value: u64) -> Option<Self> {
        Some(match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// The fields of `ModelProto` that encoding depends on, with the proto's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 unigram (the default), 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    pub byte_fallback: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub treat_whitespace_as_suffix: bool,
    /// `NormalizerSpec.name`, e.g. `identity` or `nmt_nfkc`.
    pub normalizer_name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

/// One protobuf field value.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

/// A cursor over one protobuf message; `message` names it in errors.
struct Reader<'a> {
    path: &'a Path,
    message: &'static str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(path: &'a Path, message: &'static str, bytes: &'a [u8]) -> Self {
        Self {
            path,
            message,
            bytes,
            pos: 0,
        }
    }

    fn error(&self, what: String) -> Error {
        Error::SentencePieceFormat {
            path: self.path.to_path_buf(),
            message: self.message,
            offset: self.pos,
            what,
        }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return Err(self.error("truncated varint".into()));
            };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error("varint longer than 10 bytes".into()))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                self.error(format!(
                    "field of {len} bytes runs past the end ({} left)",
                    self.bytes.len() - self.pos
                ))
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>> {
        if self.pos >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| self.error("length does not fit in memory".into()))?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => {
                return Err(self.error(format!(
                    "field {field} has wire type {wire}, expected 0, 1, 2 or 5 (groups are not \
                     used by sentencepiece_model.proto)"
                )))
            }
        };
        Ok(Some((field, value)))
    }

    fn expect_varint(&self, field: u64, name: &str, value: Value) -> Result<u64> {
        match value {
            Value::Varint(v) => Ok(v),
            _ => Err(self.error(format!("field {field} ({name}): expected a varint"))),
        }
    }

    fn expect_bytes<'v>(&self, field: u64, name: &str, value: Value<'v>) -> Result<&'v [u8]> {
        match value {
            Value::Bytes(b) => Ok(b),
            _ => Err(self.error(format!(
                "field {field} ({name}): expected a length-delimited value"
            ))),
        }
    }

    fn expect_string(&self, field: u64, name: &str, value: Value) -> Result<String> {
        let bytes = self.expect_bytes(field, name, value)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error(format!("field {field} ({name}): invalid UTF-8")))
    }
}

/// int32 fields are sign-extended to 64 bits on the wire.
fn as_i32(v: u64) -> i32 {
    v as i64 as i32
}

impl SentencePieceModel {
    /// Parses a serialized `ModelProto`.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut model = Self {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            treat_whitespace_as_suffix: false,
            normalizer_name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut r = Reader::new(path, "ModelProto", bytes);
        while let Some((field, value)) = r.next_field()? {
            match field {
                1 => {
                    let b = r.expect_bytes(field, "pieces", value)?;
                    model.pieces.push(parse_piece(path, b, model.pieces.len())?);
                }
                2 => {
                    let b = r.expect_bytes(field, "trainer_spec", value)?;
                    model.parse_trainer_spec(path, b)?;
                }
                3 => {
                    let b = r.expect_bytes(field, "normalizer_spec", value)?;
                    model.parse_normalizer_spec(path, b)?;
                }
                _ => {} // self_test_data, denormalizer_spec: not needed to encode
            }
        }
        if model.pieces.is_empty() {
            return Err(Error::SentencePieceFormat {
                path: path.to_path_buf(),
                message: "ModelProto",
                offset: bytes.len(),
                what: "no pieces (field 1): expected a SentencePiece model".into(),
            });
        }
        Ok(model)
    }

    fn parse_trainer_spec(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let mut r = Reader::new(path, "TrainerSpec", bytes);
        while let Some((field, value)) = r.next_field()? {
            match field {
                3 => self.model_type = r.expect_varint(field, "model_type", value)?,
                24 => {
                    self.treat_whitespace_as_suffix =
                        r.expect_varint(field, "treat_whitespace_as_suffix", value)? != 0
                }
                35 => self.byte_fallback = r.expect_varint(field, "byte_fallback", value)? != 0,
                40 => self.unk_id = as_i32(r.expect_varint(field, "unk_id", value)?),
                41 => self.bos_id = as_i32(r.expect_varint(field, "bos_id", value)?),
                42 => self.eos_id = as_i32(r.expect_varint(field, "eos_id", value)?),
                43 => self.pad_id = as_i32(r.expect_varint(field, "pad_id", value)?),
                _ => {}
            }
        }
        Ok(())
    }

    fn parse_normalizer_spec(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let mut r = Reader::new(path, "NormalizerSpec", bytes);
        while let Some((field, value)) = r.next_field()? {
            match field {
                1 => self.normalizer_name = r.expect_string(field, "name", value)?,
                2 => {
                    self.precompiled_charsmap = r
                        .expect_bytes(field, "precompiled_charsmap", value)?
                        .to_vec()
                }
                3 => {
                    self.add_dummy_prefix = r.expect_varint(field, "add_dummy_prefix", value)? != 0
                }
                4 => {
                    self.remove_extra_whitespaces =
                        r.expect_varint(field, "remove_extra_whitespaces", value)? != 0
                }
                5 => {
                    self.escape_whitespaces =
                        r.expect_varint(field, "escape_whitespaces", value)? != 0
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The piece with id `id`, if `id` is one (the proto's ids are -1 for "none").
    fn piece_at(&self, id: i32) -> Option<&Piece> {
        usize::try_from(id).ok().and_then(|i| self.pieces.get(i))
    }
}

fn parse_piece(path: &Path, bytes: &[u8], index: usize) -> Result<Piece> {
    let mut r = Reader::new(path, "SentencePiece", bytes);
    let mut piece = None;
    let mut score = 0.0;
    let mut kind = PieceType::Normal;
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, value) => piece = Some(r.expect_string(field, "piece", value)?),
            (2, Value::Fixed32(bits)) => score = f32::from_bits(bits),
            (2, _) => return Err(r.error(format!("piece {index}: score is not a float"))),
            (3, value) => {
                let v = r.expect_varint(field, "type", value)?;
                kind = PieceType::from_proto(v).ok_or_else(|| {
                    r.error(format!(
                        "piece {index}: unknown type {v}, expected 1 to 6 (NORMAL to BYTE)"
                    ))
                })?;
            }
            _ => {}
        }
    }
    let piece = piece.ok_or_else(|| r.error(format!("piece {index} has no text (field 1)")))?;
    Ok(Piece { piece, score, kind })
}

/// A tokenizer converted from a SentencePiece model, with what `TextTokenizer` needs besides.
pub(crate) struct Converted {
    pub tokenizer: Tokenizer,
    /// Tokens with ids past the vocabulary that encoding never produces from text (ChatGLM's
    /// `[gMASK]`, `sop`, ...), looked up before the vocabulary. They are kept out of the
    /// `tokenizers` vocabulary because a token text there has one id, and ChatGLM's `sop` may
    /// also be an ordinary piece.
    pub extra_tokens: Vec<(String, u32)>,
}

/// Reads `path` as a SentencePiece BPE model and builds the equivalent tokenizer.
pub(crate) fn convert(
    path: &Path,
    bytes: &[u8],
    flavour: SentencePieceFlavour,
) -> Result<Converted> {
    let model = SentencePieceModel::parse(path, bytes)?;
    let unsupported = |setting: String| Error::UnsupportedSentencePiece {
        path: path.to_path_buf(),
        setting,
    };
    match model.model_type {
        2 => {}
        1 => {
            return Err(unsupported(
                "model_type UNIGRAM (1): graft reads BPE models (model_type 2) only".into(),
            ))
        }
        other => {
            return Err(unsupported(format!(
                "model_type {other} ({}): graft reads BPE models (model_type 2) only",
                match other {
                    3 => "WORD",
                    4 => "CHAR",
                    _ => "unknown",
                }
            )))
        }
    }
    if model.treat_whitespace_as_suffix {
        return Err(unsupported(
            "treat_whitespace_as_suffix true: graft reads models with the `▁` prefix only".into(),
        ));
    }
    if !model.escape_whitespaces {
        return Err(unsupported(
            "escape_whitespaces false: graft reads models that write spaces as `▁` only".into(),
        ));
    }
    let unk = model.piece_at(model.unk_id).ok_or_else(|| {
        unsupported(format!(
            "unk_id {} is not a piece (the model has {} pieces)",
            model.unk_id,
            model.pieces.len()
        ))
    })?;

    let bpe = build_bpe(path, &model, &unk.piece)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer(path, &model)?))
        .map_err(|e| Error::ParseTokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE_MARK, " ")
            .map_err(|e| convert_error(path, e))?
            .into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if model.add_dummy_prefix {
        decoders.push(StripDecoder::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

    // Control and unknown pieces are special: never produced from text (SentencePiece does not
    // match `</s>` written in text), dropped by `decode`. User-defined pieces are matched in
    // text, as SentencePiece does.
    let specials: Vec<AddedToken> = model
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, PieceType::Control | PieceType::Unknown))
        .map(|p| AddedToken::from(p.piece.clone(), true).normalized(false))
        .collect();
    let user_defined: Vec<AddedToken> = model
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::UserDefined)
        .map(|p| AddedToken::from(p.piece.clone(), false).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .and_then(|_| tokenizer.add_tokens(user_defined))
        .map_err(|e| convert_error(path, e))?;
    tokenizer.set_encode_special_tokens(true);

    let vocab_size = u32::try_from(model.pieces.len())
        .map_err(|_| unsupported(format!("{} pieces, more than u32 ids", model.pieces.len())))?;
    let unk_id = model.unk_id as u32; // checked to be a piece above
    let mut extra_tokens = Vec::new();
    let pad_id = match flavour {
        SentencePieceFlavour::ChatGlm => {
            for (i, token) in CHATGLM_SPECIAL_TOKENS.iter().enumerate() {
                extra_tokens.push((token.to_string(), vocab_size + i as u32));
            }
            // `[gMASK]` and `sop` are entries 1 and 3 of CHATGLM_SPECIAL_TOKENS.
            let mut specials = vec![
                ("[gMASK]".to_string(), vocab_size + 1),
                ("sop".to_string(), vocab_size + 3),
            ];
            let eos = model.piece_at(model.eos_id);
            let pair = match eos {
                Some(eos) => {
                    specials.push((eos.piece.clone(), model.eos_id as u32));
                    format!("[gMASK] sop $A $B {}", eos.piece)
                }
                None => "[gMASK] sop $A $B".to_string(),
            };
            tokenizer.with_post_processor(Some(template(path, "[gMASK] sop $A", &pair, specials)?));
            // THUDM pads with the unknown piece.
            unk_id
        }
        SentencePieceFlavour::Plain { add_bos, add_eos } => {
            let bos = model.piece_at(model.bos_id).filter(|_| add_bos);
            let eos = model.piece_at(model.eos_id).filter(|_| add_eos);
            let mut specials = Vec::new();
            let (mut single, mut pair) = (String::new(), String::new());
            if let Some(bos) = bos {
                specials.push((bos.piece.clone(), model.bos_id as u32));
                single.push_str(&format!("{} ", bos.piece));
            }
            single.push_str("$A");
            pair.push_str(&single);
            if let Some(eos) = eos {
                specials.push((eos.piece.clone(), model.eos_id as u32));
                single.push_str(&format!(" {}", eos.piece));
                pair.push_str(&format!(" {}", eos.piece));
            }
            // Llama's pair template: each sequence gets the same BOS / EOS.
            if let Some(bos) = bos {
                pair.push_str(&format!(" {}:1", bos.piece));
            }
            pair.push_str(" $B:1");
            if let Some(eos) = eos {
                pair.push_str(&format!(" {}:1", eos.piece));
            }
            if !specials.is_empty() {
                tokenizer.with_post_processor(Some(template(path, &single, &pair, specials)?));
            }
            match model.piece_at(model.pad_id) {
                Some(_) => model.pad_id as u32,
                None => unk_id,
            }
        }
    };
    let pad_token = model
        .piece_at(pad_id as i32)
        .map(|p| p.piece.clone())
        .unwrap_or_default();
    tokenizer.with_padding(Some(PaddingParams {
        pad_id,
        pad_token,
        ..PaddingParams::default()
    }));
    Ok(Converted {
        tokenizer,
        extra_tokens,
    })
}

fn convert_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::ParseTokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn template(
    path: &Path,
    single: &str,
    pair: &str,
    specials: Vec<(String, u32)>,
) -> Result<TemplateProcessing> {
    TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| convert_error(path, e))?
        .special_tokens(specials)
        .build()
        .map_err(|e| convert_error(path, e))
}

/// SentencePiece's normalization as `tokenizers` normalizers, in SentencePiece's order: the
/// compiled character map, then (with `remove_extra_whitespaces`) leading and trailing spaces
/// dropped and runs of spaces made one, then (with `add_dummy_prefix`) a `▁` before non-empty
/// text, then spaces written as `▁`.
fn normalizer(path: &Path, model: &SentencePieceModel) -> Result<NormalizerWrapper> {
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if !model.precompiled_charsmap.is_empty() {
        let precompiled = Precompiled::from(&model.precompiled_charsmap).map_err(|e| {
            Error::SentencePieceFormat {
                path: path.to_path_buf(),
                message: "NormalizerSpec",
                offset: 0,
                what: format!(
                    "precompiled_charsmap of normalizer {:?}: {e}",
                    model.normalizer_name
                ),
            }
        })?;
        steps.push(precompiled.into());
    }
    let replace = |pattern: ReplacePattern, content: &str| {
        Replace::new(pattern, content).map_err(|e| convert_error(path, e))
    };
    if model.remove_extra_whitespaces {
        // Only the space character: SentencePiece leaves tabs and newlines alone here.
        steps.push(replace(ReplacePattern::Regex(r"\A +| +\z".into()), "")?.into());
        steps.push(replace(ReplacePattern::Regex(" {2,}".into()), " ")?.into());
    }
    if model.add_dummy_prefix {
        steps.push(Prepend::new(SPACE_MARK.into()).into());
    }
    steps.push(replace(ReplacePattern::String(" ".into()), SPACE_MARK)?.into());
    Ok(Sequence::new(steps).into())
}

/// BPE over the pieces, with merges derived as transformers' `generate_merges` does: every
/// split of a piece into two pieces is a merge, ranked by the piece's score (highest first),
/// ties by the lengths of the two halves (longest first), then by the piece's id and the
/// halves' ids (the order of transformers' stable sort).
fn build_bpe(path: &Path, model: &SentencePieceModel, unk: &str) -> Result<BPE> {
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (id, p) in model.pieces.iter().enumerate() {
        // A duplicate piece keeps its first id, as SentencePiece's own lookup does.
        vocab.entry(p.piece.clone()).or_insert(id as u32);
    }

    // (score, left length, right length, piece id, left id, right id, left, right)
    type Merge<'a> = (f32, usize, usize, usize, u32, u32, &'a str, &'a str);
    let mut merges: Vec<Merge> = Vec::new();
    for (id, p) in model.pieces.iter().enumerate() {
        // SentencePiece never builds control, unknown or byte pieces by merging.
        if matches!(
            p.kind,
            PieceType::Control | PieceType::Unknown | PieceType::Byte
        ) {
            continue;
        }
        let text = p.piece.as_str();
        for (split, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((
                    p.score,
                    left.chars().count(),
                    right.chars().count(),
                    id,
                    l,
                    r,
                    left,
                    right,
                ));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.1.cmp(&a.1))
            .then(b.2.cmp(&a.2))
            .then(a.3.cmp(&b.3))
            .then(a.4.cmp(&b.4))
            .then(a.5.cmp(&b.5))
    });
    let merges = merges
        .into_iter()
        .map(|m| (m.6.to_string(), m.7.to_string()))
        .collect();

    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.to_string())
        .fuse_unk(true)
        .byte_fallback(model.byte_fallback)
        .build()
        .map_err(|e| convert_error(path, e))
}

/// True when `path` names, or `bytes` look like, a SentencePiece model rather than a
/// `tokenizer.json`: a `.model` extension, or content that does not start like JSON but like a
/// `ModelProto` (field 1, length-delimited: byte 0x0A).
pub(crate) fn looks_like_sentencepiece(path: &Path, bytes: &[u8]) -> bool {
    if path.extension().is_some_and(|e| e == "model") {
        return true;
    }
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    bytes.first() == Some(&0x0A) && first != Some(&b'{')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_paths::proto::{field_bytes, field_varint, piece};

    /// A tiny BPE model: `<unk> <s> </s>`, then `▁ a b ▁a ab ▁ab`, with `model_type`.
    fn tiny_model(model_type: u64) -> Vec<u8> {
        let mut m = Vec::new();
        for (text, score, kind) in [
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("\u{2581}", -1.0, 1),
            ("a", -2.0, 1),
            ("b", -3.0, 1),
            ("\u{2581}a", -4.0, 1),
            ("ab", -5.0, 1),
            ("\u{2581}ab", -6.0, 1),
        ] {
            field_bytes(1, &piece(text, score, kind), &mut m);
        }
        let mut trainer = Vec::new();
        field_varint(3, model_type, &mut trainer);
        field_varint(43, -1i64 as u64, &mut trainer); // pad_id -1, sign-extended
        field_bytes(2, &trainer, &mut m);
        let mut normalizer = Vec::new();
        field_bytes(1, b"identity", &mut normalizer);
        field_varint(4, 0, &mut normalizer);
        field_bytes(3, &normalizer, &mut m);
        m
    }

    #[test]
    fn parses_pieces_and_specs() {
        let m = SentencePieceModel::parse(Path::new("t.model"), &tiny_model(2)).unwrap();
        assert_eq!(m.pieces.len(), 9);
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.pieces[1].kind, PieceType::Control);
        assert_eq!(m.pieces[6].piece, "\u{2581}a");
        assert_eq!(m.pieces[6].score, -4.0);
        assert_eq!((m.model_type, m.pad_id, m.bos_id), (2, -1, 1));
        assert_eq!(m.normalizer_name, "identity");
        assert!(m.add_dummy_prefix && !m.remove_extra_whitespaces);
    }

    #[test]
    fn encodes_with_merges_by_score() {
        let path = Path::new("t.model");
        let flavour = SentencePieceFlavour::Plain {
            add_bos: true,
            add_eos: false,
        };
        let c = convert(path, &tiny_model(2), flavour).unwrap();
        let ids = |text: &str| c.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        // "▁ab" merges to one piece; "▁b▁a" has no `▁b`.
        assert_eq!(ids("ab"), vec![1, 8]);
        assert_eq!(ids("b a"), vec![1, 3, 5, 6]);
        // An unknown character, no byte pieces: the unknown piece.
        assert_eq!(ids("a?"), vec![1, 6, 0]);
        assert_eq!(c.tokenizer.decode(&[1, 6, 5], true).unwrap(), "ab");
        assert!(c.extra_tokens.is_empty());
    }

    #[test]
    fn unigram_is_refused_by_name() {
        let err = convert(
            Path::new("t.model"),
            &tiny_model(1),
            SentencePieceFlavour::ChatGlm,
        )
        .err()
        .unwrap();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::UnsupportedSentencePiece { .. }),
            "{msg}"
        );
        assert!(msg.contains("UNIGRAM") && msg.contains("t.model"), "{msg}");
    }

    #[test]
    fn malformed_bytes_are_typed_errors() {
        let path = Path::new("bad.model");
        let model = tiny_model(2);
        // Cut inside the first piece's length-delimited field.
        let err = SentencePieceModel::parse(path, &model[..5]).unwrap_err();
        assert!(matches!(err, Error::SentencePieceFormat { .. }), "{err}");
        assert!(err.to_string().contains("runs past the end"), "{err}");
        // Wire type 7 does not exist.
        let err = SentencePieceModel::parse(path, &[0x0f]).unwrap_err();
        assert!(err.to_string().contains("wire type 7"), "{err}");
        // A truncated varint.
        let err = SentencePieceModel::parse(path, &[0x08, 0x80]).unwrap_err();
        assert!(err.to_string().contains("truncated varint"), "{err}");
        // No pieces at all.
        let err = SentencePieceModel::parse(path, &[0x20, 0x01]).unwrap_err();
        assert!(err.to_string().contains("no pieces"), "{err}");
        // A piece type past BYTE.
        let mut m = Vec::new();
        field_bytes(1, &piece("x", 0.0, 9), &mut m);
        let err = SentencePieceModel::parse(path, &m).unwrap_err();
        assert!(err.to_string().contains("unknown type 9"), "{err}");
    }

    #[test]
    fn flavour_comes_from_the_files_beside_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tokenizer.model");
        assert_eq!(
            SentencePieceFlavour::detect(&model).unwrap(),
            SentencePieceFlavour::Plain {
                add_bos: true,
                add_eos: false
            }
        );
        let config = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &config,
            r#"{"add_bos_token": false, "add_eos_token": true}"#,
        )
        .unwrap();
        assert_eq!(
            SentencePieceFlavour::detect(&model).unwrap(),
            SentencePieceFlavour::Plain {
                add_bos: false,
                add_eos: true
            }
        );
        std::fs::write(&config, r#"{"tokenizer_class": "ChatGLMTokenizer"}"#).unwrap();
        assert_eq!(
            SentencePieceFlavour::detect(&model).unwrap(),
            SentencePieceFlavour::ChatGlm
        );
        std::fs::remove_file(&config).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "chatglm"}"#,
        )
        .unwrap();
        assert_eq!(
            SentencePieceFlavour::detect(&model).unwrap(),
            SentencePieceFlavour::ChatGlm
        );
        std::fs::write(&config, "[1]").unwrap();
        let err = SentencePieceFlavour::detect(&model).unwrap_err();
        assert!(matches!(err, Error::TokenizerConfig { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }

    #[test]
    fn sentencepiece_is_told_from_json() {
        assert!(looks_like_sentencepiece(Path::new("x.model"), b"{"));
        assert!(looks_like_sentencepiece(Path::new("x.bin"), &tiny_model(2)));
        assert!(!looks_like_sentencepiece(
            Path::new("tokenizer.json"),
            b" {\"a\": 1}"
        ));
    }
}
