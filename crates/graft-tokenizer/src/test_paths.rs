//! Real tokenizers kept next to the workspace, in `../shared/models`.
use std::path::{Path, PathBuf};

use crate::tokenizer::{Padding, TextTokenizer};

fn shared_model_file(model: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models")
        .join(model)
        .join("tokenizer.json");
    assert!(
        path.is_file(),
        "{model} tokenizer not found at {} (expected ../shared/models next to the workspace)",
        path.display()
    );
    path
}

/// stories260K: Llama's sentencepiece BPE, vocab 512, BOS `<s>` (1) added, EOS `</s>` (2).
pub fn stories_tokenizer_path() -> PathBuf {
    shared_model_file("stories260K")
}

/// SmolLM2-135M-Instruct: byte-level BPE, ChatML special tokens, no special tokens added.
pub fn smollm2_tokenizer_path() -> PathBuf {
    shared_model_file("smollm2-135m-instruct")
}

pub fn stories_tokenizer(max_len: usize) -> TextTokenizer {
    TextTokenizer::from_file(&stories_tokenizer_path(), max_len, Padding::Longest).unwrap()
}

pub fn smollm2_tokenizer(max_len: usize) -> TextTokenizer {
    TextTokenizer::from_file(&smollm2_tokenizer_path(), max_len, Padding::Longest).unwrap()
}

/// Writes the protobuf fields of a SentencePiece `ModelProto`, for test models.
pub mod proto {
    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    pub fn field_varint(field: u64, v: u64, out: &mut Vec<u8>) {
        varint(field << 3, out);
        varint(v, out);
    }

    pub fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint((field << 3) | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    pub fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        field_bytes(1, text.as_bytes(), &mut p);
        varint((2 << 3) | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        field_varint(3, kind, &mut p);
        p
    }
}

/// A ChatGLM-like tokenizer: a SentencePiece BPE model with every byte as a piece (so any text
/// encodes), `▁` and a few letters, with THUDM's `tokenizer_config.json` beside it. Its 264
/// pieces put `[gMASK]` at 265 and `sop` at 267.
pub fn chatglm_tokenizer(max_len: usize) -> (tempfile::TempDir, TextTokenizer) {
    use proto::{field_bytes, field_varint, piece};
    let mut m = Vec::new();
    let mut pieces: Vec<(String, f32, u64)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    pieces.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    for (i, p) in ["\u{2581}", "H", "i", "\u{2581}H", "\u{2581}Hi"]
        .iter()
        .enumerate()
    {
        pieces.push((p.to_string(), -(i as f32), 1));
    }
    for (text, score, kind) in &pieces {
        field_bytes(1, &piece(text, *score, *kind), &mut m);
    }
    let mut trainer = Vec::new();
    field_varint(3, 2, &mut trainer); // BPE
    field_varint(35, 1, &mut trainer); // byte_fallback
    field_bytes(2, &trainer, &mut m);
    let mut normalizer = Vec::new();
    field_bytes(1, b"identity", &mut normalizer);
    field_varint(4, 0, &mut normalizer); // remove_extra_whitespaces false
    field_bytes(3, &normalizer, &mut m);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.model");
    std::fs::write(&path, m).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"tokenizer_class": "ChatGLMTokenizer"}"#,
    )
    .unwrap();
    let tok = TextTokenizer::from_file(&path, max_len, Padding::Longest).unwrap();
    (dir, tok)
}
