//! Tokenizer loading (Hugging Face `tokenizer.json`), padded batch encoding, text templates over
//! CSV columns and label sets.

mod error;
mod labels;
mod template;
mod tokenizer;

pub use error::{Error, Result};
pub use labels::LabelSet;
pub use template::{Template, DEFAULT_TEMPLATE, TEMPLATE_WITH_AUTHOR};
pub use tokenizer::{EncodedBatch, Padding, TextTokenizer};
