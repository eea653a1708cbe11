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
