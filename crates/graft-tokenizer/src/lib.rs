//! Tokenizer loading (Hugging Face `tokenizer.json`, SentencePiece BPE `tokenizer.model`), padded batch encoding, text templates over
//! CSV columns and label sets; for causal-LM fine-tuning, chat templates, prompt-response
//! pairs and label-shifted batches; for sequence tagging, phrases marked as spans and spans as
//! per-token BIO tags.

mod causal;
mod chat;
mod error;
mod labels;
mod spans;
mod spm;
mod template;
#[cfg(test)]
mod test_paths;
mod tokenizer;

pub use causal::{encode_causal, encode_prompt, CausalBatch, PromptResponse, IGNORE_INDEX};
pub use chat::{ChatTemplate, EOS_CANDIDATES};
pub use error::{Error, Result};
pub use labels::LabelSet;
pub use spans::{entities, mark_phrases, tag_tokens, Marked, Span, Tag, TokenOffsets};
pub use spm::{Piece, PieceType, SentencePieceFlavour, SentencePieceModel, CHATGLM_SPECIAL_TOKENS};
pub use template::{Template, DEFAULT_TEMPLATE, TEMPLATE_WITH_AUTHOR};
pub use tokenizer::{tokenizer_in, EncodedBatch, Padding, TextTokenizer};
