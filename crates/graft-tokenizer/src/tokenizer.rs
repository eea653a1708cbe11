use std::path::{Path, PathBuf};

use tokenizers::{
    Encoding, PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};
use crate::spm::{self, looks_like_sentencepiece, SentencePieceFlavour};

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadTokenizer {
        path: path.to_path_buf(),
        source,
    })
}

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Pad to the longest sequence in the batch.
    Longest,
    /// Always pad to `max_len`.
    Fixed,
}

/// A padded batch, every vector row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
}

/// A Hugging Face tokenizer with graft's truncation and padding rules.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    path: PathBuf,
    tokenizer: Tokenizer,
    /// Tokens past the vocabulary that text never encodes to (ChatGLM's `[gMASK]`, `sop`, ...),
    /// looked up before it; empty for a `tokenizer.json`.
    extra_tokens: Vec<(String, u32)>,
    /// The same tokenizer without truncation, for callers that truncate by their own rules
    /// (causal fine-tuning drops the start of a prompt, where `tokenizer` would drop the end).
    untruncated: Tokenizer,
    max_len: usize,
    padding: Padding,
    pad_id: u32,
    pad_type_id: u32,
}

/// The tokenizer file of a model folder: `tokenizer.json`, else the SentencePiece
/// `tokenizer.model` that ChatGLM ships without one; `tokenizer.json` when there is neither
/// (so that the error names the usual file).
pub fn tokenizer_in(dir: &Path) -> std::path::PathBuf {
    let json = dir.join("tokenizer.json");
    let model = dir.join("tokenizer.model");
    if !json.is_file() && model.is_file() {
        model
    } else {
        json
    }
}

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`, or a SentencePiece BPE model (a `.model` file, or
    /// any file whose content is one) read with the conventions
    /// [`SentencePieceFlavour::detect`] finds beside it. Sequences are truncated to `max_len`
    /// tokens, special tokens included, as Hugging Face does with
    /// `truncation=True, max_length=max_len`.
    pub fn from_file(path: &Path, max_len: usize, padding: Padding) -> Result<Self> {
        let bytes = read(path)?;
        if looks_like_sentencepiece(path, &bytes) {
            let flavour = SentencePieceFlavour::detect(path)?;
            let converted = spm::convert(path, &bytes, flavour)?;
            return Self::new(
                path,
                converted.tokenizer,
                converted.extra_tokens,
                max_len,
                padding,
            );
        }
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| Error::ParseTokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::new(path, tokenizer, Vec::new(), max_len, padding)
    }

    /// Loads a SentencePiece BPE model with the given conventions, whatever lies beside it.
    pub fn from_sentencepiece(
        path: &Path,
        max_len: usize,
        padding: Padding,
        flavour: SentencePieceFlavour,
    ) -> Result<Self> {
        let converted = spm::convert(path, &read(path)?, flavour)?;
        Self::new(
            path,
            converted.tokenizer,
            converted.extra_tokens,
            max_len,
            padding,
        )
    }

    fn new(
        path: &Path,
        mut tokenizer: Tokenizer,
        extra_tokens: Vec<(String, u32)>,
        max_len: usize,
        padding: Padding,
    ) -> Result<Self> {
        // The tokenizers crate subtracts the special tokens from max_length without checking,
        // so too small a max_len must be refused here.
        let special_tokens = tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(false))
            .unwrap_or(0);
        if max_len <= special_tokens {
            return Err(Error::MaxLenTooSmall {
                path: path.to_path_buf(),
                max_len,
                special_tokens,
            });
        }

        // Pad id from the file's padding config (recorded before that config is dropped).
        let (pad_id, pad_type_id) = match tokenizer.get_padding() {
            Some(p) => (p.pad_id, p.pad_type_id),
            None => {
                let id = tokenizer
                    .token_to_id("[PAD]")
                    .or_else(|| tokenizer.token_to_id("<pad>"))
                    .unwrap_or(0);
                (id, 0)
            }
        };

        // Padding is done by hand in encode_batch (always on the right), so that it does not
        // depend on whatever padding the file configures.
        tokenizer.with_padding(None);
        let mut untruncated = tokenizer.clone();
        untruncated
            .with_truncation(None)
            .map_err(|e| Error::Truncation {
                path: path.to_path_buf(),
                max_len,
                message: e.to_string(),
            })?;

        // Keep the file's truncation side, but our length and a plain strategy.
        let direction = tokenizer
            .get_truncation()
            .map(|t| t.direction)
            .unwrap_or(TruncationDirection::Right);
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Truncation {
                path: path.to_path_buf(),
                max_len,
                message: e.to_string(),
            })?;

        Ok(Self {
            path: path.to_path_buf(),
            tokenizer,
            extra_tokens,
            untruncated,
            max_len,
            padding,
            pad_id,
            pad_type_id,
        })
    }

    /// Encodes and pads a batch (special tokens added, truncated to `max_len`, padded on the
    /// right with `pad_id`).
    pub fn encode_batch(&self, texts: &[String]) -> Result<EncodedBatch> {
        let mut encodings = Vec::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            encodings.push(self.encode_one(index, text)?);
        }

        let seq_len = match self.padding {
            Padding::Fixed => self.max_len,
            Padding::Longest => encodings.iter().map(|e| e.len()).max().unwrap_or(0),
        };
        let batch = encodings.len();
        let mut input_ids = Vec::with_capacity(batch * seq_len);
        let mut attention_mask = Vec::with_capacity(batch * seq_len);
        let mut token_type_ids = Vec::with_capacity(batch * seq_len);
        for encoding in &encodings {
            let len = encoding.len();
            let pad = seq_len - len;
            input_ids.extend_from_slice(encoding.get_ids());
            input_ids.extend(std::iter::repeat_n(self.pad_id, pad));
            attention_mask.extend(std::iter::repeat_n(1, len));
            attention_mask.extend(std::iter::repeat_n(0, pad));
            token_type_ids.extend_from_slice(encoding.get_type_ids());
            token_type_ids.extend(std::iter::repeat_n(self.pad_type_id, pad));
        }

        Ok(EncodedBatch {
            input_ids,
            attention_mask,
            token_type_ids,
            batch,
            seq_len,
        })
    }

    /// Token ids of one text: special tokens added, truncated to `max_len`, not padded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_one(0, text)?.get_ids().to_vec())
    }

    /// Token ids of one text as [`TextTokenizer::encode`] gives them, with each token's byte
    /// offsets into `text` (`None` for the special tokens the tokenizer adds): what sequence
    /// tagging labels tokens by ([`crate::tag_tokens`]).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<crate::TokenOffsets>)> {
        let encoding = self.encode_one(0, text)?;
        let offsets = encoding
            .get_offsets()
            .iter()
            .zip(encoding.get_special_tokens_mask())
            .map(|(&offset, &special)| (special == 0).then_some(offset))
            .collect();
        Ok((encoding.get_ids().to_vec(), offsets))
    }

    /// Token ids of one text without the tokenizer's special tokens (no BOS) and never
    /// truncated: for text that continues a sequence, such as an answer after its prompt.
    pub fn encode_no_special(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_untruncated(0, text, false)?.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let kept: Vec<u32>;
        let ids = if self.extra_tokens.is_empty() {
            ids
        } else {
            kept = ids
                .iter()
                .copied()
                .filter(|id| !self.extra_tokens.iter().any(|(_, e)| e == id))
                .collect();
            &kept
        };
        self.tokenizer.decode(ids, true).map_err(|e| Error::Decode {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.extra_tokens
            .iter()
            .find(|(t, _)| t == token)
            .map(|&(_, id)| id)
            .or_else(|| self.tokenizer.token_to_id(token))
    }

    /// Vocabulary size including added tokens (Python's `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        let extra = self.extra_tokens.iter().map(|&(_, id)| id as usize + 1);
        extra
            .max()
            .unwrap_or(0)
            .max(self.tokenizer.get_vocab_size(true))
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn padding(&self) -> Padding {
        self.padding
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Text `index` of a batch encoded in full, whatever `max_len`.
    pub(crate) fn encode_untruncated(
        &self,
        index: usize,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Encoding> {
        self.untruncated
            .encode(text, add_special_tokens)
            .map_err(|e| self.encode_error(index, e))
    }

    fn encode_error(&self, index: usize, e: tokenizers::Error) -> Error {
        Error::Encode {
            path: self.path.clone(),
            index,
            message: e.to_string(),
        }
    }

    fn encode_one(&self, index: usize, text: &str) -> Result<Encoding> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| self.encode_error(index, e))?;
        // Guards the padding arithmetic in encode_batch against a tokenizer that ignores
        // truncation.
        if encoding.len() > self.max_len {
            return Err(Error::TooLong {
                path: self.path.clone(),
                index,
                max_len: self.max_len,
                found: encoding.len(),
            });
        }
        Ok(encoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_paths::smollm2_tokenizer_path;

    /// MiniLM's WordPiece: [CLS] and [SEP] have no offsets, and each word piece points back at
    /// the bytes it came from, so a phrase marked in the text tags exactly its pieces.
    #[test]
    fn offsets_lead_back_to_the_text_and_tag_its_phrases() {
        let tokenizer =
            TextTokenizer::from_file(&minilm_tokenizer_path(), 64, Padding::Longest).unwrap();
        let text = "Graphene oxide membranes: a review";
        let (ids, offsets) = tokenizer.encode_with_offsets(text).unwrap();
        assert_eq!(ids, tokenizer.encode(text).unwrap());
        assert_eq!((offsets[0], offsets[ids.len() - 1]), (None, None));
        let pieces: Vec<&str> = offsets
            .iter()
            .flatten()
            .map(|&(a, b)| &text[a..b])
            .collect();
        // Every byte but the spaces belongs to one piece, in order (offsets index the text as
        // given, not the lower-cased form WordPiece reads).
        assert_eq!(pieces.concat(), text.replace(' ', ""));
        let marked = crate::mark_phrases(text, &["graphene oxide".to_string()], "");
        let tags: Vec<String> = crate::tag_tokens(&offsets, &marked.spans)
            .iter()
            .map(|t| t.as_ref().map_or("-".into(), crate::Tag::label))
            .collect();
        // The phrase's pieces (however WordPiece splits the two words) are B then I, the rest O.
        let phrase_pieces = offsets
            .iter()
            .flatten()
            .filter(|&&(_, end)| end <= "Graphene oxide".len())
            .count();
        let mut expected = vec!["-".to_string(), "B".to_string()];
        expected.extend(std::iter::repeat_n("I".to_string(), phrase_pieces - 1));
        expected.extend(std::iter::repeat_n(
            "O".to_string(),
            ids.len() - 2 - phrase_pieces,
        ));
        expected.push("-".to_string());
        assert_eq!(tags, expected);
    }

    /// Folder holding all-MiniLM-L6-v2's tokenizer.json: $GRAFT_MINILM_DIR, else graft's cache.
    fn minilm_tokenizer_path() -> PathBuf {
        let dir = match std::env::var_os("GRAFT_MINILM_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home = std::env::var_os("HOME").unwrap_or_default();
                PathBuf::from(home).join(".cache/graft/models/all-minilm-l6-v2")
            }
        };
        let path = dir.join("tokenizer.json");
        assert!(
            path.is_file(),
            "all-MiniLM-L6-v2 tokenizer not found at {}: run `cargo xtask fetch-model minilm` \
             (or set GRAFT_MINILM_DIR to a folder holding tokenizer.json)",
            path.display()
        );
        path
    }

    const FOX: &str = "The quick brown fox jumps over the lazy dog.";
    const FOX_IDS: [u32; 12] = [
        101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102,
    ];

    #[test]
    fn minilm_fixed_padding_matches_hugging_face() {
        let tok = TextTokenizer::from_file(&minilm_tokenizer_path(), 32, Padding::Fixed).unwrap();
        let batch = tok.encode_batch(&[FOX.to_string()]).unwrap();
        assert_eq!(batch.batch, 1);
        assert_eq!(batch.seq_len, 32);
        let mut ids = FOX_IDS.to_vec();
        ids.resize(32, 0);
        assert_eq!(batch.input_ids, ids);
        let mut mask = vec![1u32; 12];
        mask.resize(32, 0);
        assert_eq!(batch.attention_mask, mask);
        assert_eq!(batch.token_type_ids, vec![0u32; 32]);
        assert_eq!(tok.pad_id(), 0);
        assert_eq!(tok.vocab_size(), 30522);
        assert_eq!(tok.max_len(), 32);
        assert_eq!(tok.token_to_id("[CLS]"), Some(101));
        assert_eq!(tok.token_to_id("[SEP]"), Some(102));
    }

    #[test]
    fn minilm_encode_is_unpadded() {
        let tok = TextTokenizer::from_file(&minilm_tokenizer_path(), 32, Padding::Fixed).unwrap();
        assert_eq!(tok.encode(FOX).unwrap(), FOX_IDS.to_vec());
        assert_eq!(tok.encode("").unwrap(), vec![101, 102]);
    }

    #[test]
    fn minilm_longest_padding_pads_to_longest_in_batch() {
        let tok = TextTokenizer::from_file(&minilm_tokenizer_path(), 32, Padding::Longest).unwrap();
        let batch = tok
            .encode_batch(&["the dog".to_string(), FOX.to_string()])
            .unwrap();
        assert_eq!(batch.batch, 2);
        assert_eq!(batch.seq_len, 12);
        assert_eq!(batch.input_ids.len(), 24);
        assert_eq!(&batch.input_ids[..4], &[101, 1996, 3899, 102]);
        assert_eq!(&batch.input_ids[4..12], &[0; 8]);
        assert_eq!(&batch.input_ids[12..], &FOX_IDS);
        assert_eq!(
            &batch.attention_mask[..12],
            &[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&batch.attention_mask[12..], &[1; 12]);
    }

    #[test]
    fn minilm_truncates_keeping_special_tokens() {
        let tok = TextTokenizer::from_file(&minilm_tokenizer_path(), 8, Padding::Fixed).unwrap();
        let ids = tok.encode(FOX).unwrap();
        // Hugging Face keeps [CLS] and [SEP] and drops words from the end.
        assert_eq!(ids, vec![101, 1996, 4248, 2829, 4419, 14523, 2058, 102]);
        let batch = tok.encode_batch(&[FOX.to_string()]).unwrap();
        assert_eq!(batch.seq_len, 8);
        assert_eq!(batch.attention_mask, vec![1; 8]);
    }

    #[test]
    fn minilm_empty_batch() {
        let tok = TextTokenizer::from_file(&minilm_tokenizer_path(), 16, Padding::Longest).unwrap();
        let batch = tok.encode_batch(&[]).unwrap();
        assert_eq!(batch.batch, 0);
        assert!(batch.input_ids.is_empty());
    }

    #[test]
    fn max_len_too_small_is_an_error() {
        let path = minilm_tokenizer_path();
        for max_len in [0, 1, 2] {
            let err = TextTokenizer::from_file(&path, max_len, Padding::Fixed).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::MaxLenTooSmall { .. }), "{msg}");
            assert!(msg.contains("tokenizer.json"), "{msg}");
            assert!(msg.contains(&format!("found max_len {max_len}")), "{msg}");
        }
        assert!(TextTokenizer::from_file(&path, 3, Padding::Fixed).is_ok());
    }

    #[test]
    fn smollm2_encodes_and_round_trips_through_vocabulary() {
        let tok =
            TextTokenizer::from_file(&smollm2_tokenizer_path(), 64, Padding::Longest).unwrap();
        let hello = tok
            .token_to_id("Hello")
            .expect("SmolLM2 has a `Hello` token");
        let world = tok
            .token_to_id("Ġworld")
            .expect("SmolLM2 has a `Ġworld` token");
        // No post-processor: no special tokens are added.
        assert_eq!(tok.encode("Hello world").unwrap(), vec![hello, world]);
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        // No padding config and no [PAD] / <pad> token: pad with 0.
        assert_eq!(tok.pad_id(), 0);

        let batch = tok
            .encode_batch(&["Hello world".to_string(), "Hello".to_string()])
            .unwrap();
        assert_eq!(batch.seq_len, 2);
        assert_eq!(batch.input_ids, vec![hello, world, hello, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 0]);
    }

    #[test]
    fn encode_no_special_adds_no_bos_and_never_truncates() {
        let tok = crate::test_paths::stories_tokenizer(8);
        let text = "Once upon a time, there was a little girl named Lily.";
        let with_bos = tok.encode(text).unwrap();
        assert_eq!(with_bos.len(), 8);
        assert_eq!(with_bos[0], 1);
        let ids = tok.encode_no_special(text).unwrap();
        assert!(ids.len() > 8);
        assert!(!ids.contains(&1));
        assert_eq!(&ids[..7], &with_bos[1..]);
        assert_eq!(tok.encode_no_special("").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = Path::new("no/such/dir/tokenizer.json");
        let err = TextTokenizer::from_file(path, 32, Padding::Fixed).unwrap_err();
        assert!(matches!(err, Error::ReadTokenizer { .. }));
        assert!(err.to_string().contains("no/such/dir/tokenizer.json"));
    }

    #[test]
    fn invalid_json_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = TextTokenizer::from_file(&path, 32, Padding::Fixed).unwrap_err();
        assert!(matches!(err, Error::ParseTokenizer { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    /// A folder's tokenizer: tokenizer.json first, then ChatGLM's tokenizer.model.
    #[test]
    fn tokenizer_in_prefers_json_then_sentencepiece() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(tokenizer_in(dir.path()), dir.path().join("tokenizer.json"));
        std::fs::write(dir.path().join("tokenizer.model"), b"").unwrap();
        assert_eq!(tokenizer_in(dir.path()), dir.path().join("tokenizer.model"));
        std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
        assert_eq!(tokenizer_in(dir.path()), dir.path().join("tokenizer.json"));
    }
}
