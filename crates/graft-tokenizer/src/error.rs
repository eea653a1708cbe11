use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read tokenizer file {path}: {source}")]
    ReadTokenizer {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The tokenizers crate reports errors as boxed trait objects, so only the text is kept.
    #[error(
        "cannot parse tokenizer file {path} (expected a Hugging Face tokenizer.json or a \
         SentencePiece tokenizer.model): {message}"
    )]
    ParseTokenizer { path: PathBuf, message: String },

    #[error(
        "SentencePiece model {path}: malformed {message} at byte {offset}: {what} (expected a \
         serialized sentencepiece ModelProto, such as a tokenizer.model)"
    )]
    SentencePieceFormat {
        path: PathBuf,
        /// The protobuf message being read.
        message: &'static str,
        /// Byte offset inside that message.
        offset: usize,
        what: String,
    },

    #[error("SentencePiece model {path}: unsupported setting: {setting}")]
    UnsupportedSentencePiece { path: PathBuf, setting: String },

    #[error("tokenizer configuration {path}: {message}")]
    TokenizerConfig { path: PathBuf, message: String },

    #[error(
        "tokenizer {path}: chat template {template:?} needs the token {token:?}, which is not a \
         token of the vocabulary (expected a {family} tokenizer: its tokenizer.model with \
         tokenizer_config.json beside it)"
    )]
    MissingTemplateToken {
        path: PathBuf,
        template: &'static str,
        token: &'static str,
        family: &'static str,
    },

    #[error(
        "tokenizer {path}: max_len must be greater than the {special_tokens} special token(s) \
         the tokenizer adds to every sequence, found max_len {max_len}"
    )]
    MaxLenTooSmall {
        path: PathBuf,
        max_len: usize,
        special_tokens: usize,
    },

    #[error("tokenizer {path}: cannot configure truncation to max_len {max_len}: {message}")]
    Truncation {
        path: PathBuf,
        max_len: usize,
        message: String,
    },

    #[error("tokenizer {path}: cannot decode token ids: {message}")]
    Decode { path: PathBuf, message: String },

    #[error("tokenizer {path}: cannot encode text {index} of the batch: {message}")]
    Encode {
        path: PathBuf,
        index: usize,
        message: String,
    },

    #[error(
        "tokenizer {path}: text {index} of the batch encoded to {found} tokens, \
         expected at most max_len {max_len}"
    )]
    TooLong {
        path: PathBuf,
        index: usize,
        max_len: usize,
        found: usize,
    },

    #[error("template {template:?}: {message} at character {position}")]
    TemplateSyntax {
        template: String,
        /// 1-based character position in the template.
        position: usize,
        message: String,
    },

    #[error(
        "template {template:?} uses column {column:?}, which is not among the available \
         columns: {}",
        quoted_list(.available)
    )]
    MissingColumn {
        template: String,
        column: String,
        available: Vec<String>,
    },

    #[error("template {template:?}: no value given for column {column:?}")]
    MissingValue { template: String, column: String },

    #[error("label set is empty: expected at least one label")]
    EmptyLabelSet,

    #[error("label {position} is empty (or only whitespace): expected a non-empty label")]
    EmptyLabel {
        /// 1-based position in the list.
        position: usize,
    },

    #[error("label {label:?} is given twice, at positions {first} and {second}: expected distinct labels")]
    DuplicateLabel {
        label: String,
        first: usize,
        second: usize,
    },

    #[error(
        "unknown chat template {name:?}: expected one of {}",
        quoted_list(.known)
    )]
    UnknownChatTemplate { name: String, known: Vec<String> },

    #[error("chat template {template:?} takes no {option} (only {supported_by:?} does)")]
    UnsupportedTemplateOption {
        template: &'static str,
        option: &'static str,
        supported_by: &'static str,
    },

    #[error(
        "tokenizer {path}: chat template {template:?} ends answers with {token:?}, which is not \
         a token of the vocabulary (expected the text of a single token)"
    )]
    MissingStopToken {
        path: PathBuf,
        template: &'static str,
        token: String,
    },

    #[error(
        "tokenizer {path}: the prompt of example {index} of the batch encodes to no tokens: \
         expected at least one, to predict the response's first token from"
    )]
    EmptyPrompt { path: PathBuf, index: usize },

    #[error(
        "example {index} of the batch: the response encodes to no tokens and chat template \
         {template:?} has no stop token here, so there is nothing to learn: expected a \
         non-empty response"
    )]
    NothingToLearn {
        index: usize,
        template: &'static str,
    },

    #[error(
        "example {index} of the batch: the response needs {response_tokens} tokens (stop token \
         included) and the prompt at least {prompt_tokens}, more than max_len {max_len}"
    )]
    ResponseTooLong {
        index: usize,
        response_tokens: usize,
        prompt_tokens: usize,
        max_len: usize,
    },
}

/// Crate-wide result alias.
pub type Result<T> = std::result::Result<T, Error>;

/// `"a", "b", "c"`: quoted so that stray whitespace in a name is visible.
pub(crate) fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
