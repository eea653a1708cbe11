//! The tagging extractor: a token classifier trained by `graft train` (`model.pooling =
//! "tokens"`, the keywords marked in title + abstract) reads each paper's text as it was
//! trained, and its tagged spans become keywords: normalised as the scores compare them,
//! deduplicated, ranked by the span's mean probability of its tags, and kept from `min_score`
//! up.
use super::{score::normalise, KeywordExtractor, Paper};
use crate::task::Classifier;
use crate::{Error, Result};
use candle_core::{Device, D};
use graft_model::models::bert::Pooling;
use graft_peft::loader::Registry;
use graft_tokenizer::{entities, EncodedBatch, Tag, Template};
use std::path::Path;

pub struct TaggingExtractor {
    classifier: Classifier,
    template: Template,
    /// The least mean tag probability of a span kept as a keyword.
    pub min_score: f64,
}

impl TaggingExtractor {
    /// Opens the token-classification adapter at `dir`.
    pub fn open(dir: &Path, registry: &Registry, device: &Device, min_score: f64) -> Result<Self> {
        let classifier = Classifier::open(dir, registry, device)?;
        if classifier.spec.pooling != Pooling::Tokens {
            return Err(Error::Adapter {
                path: dir.to_path_buf(),
                reason: "not a token classifier (its task's pooling is not \"tokens\")".into(),
            });
        }
        Ok(Self {
            template: Template::parse(&classifier.spec.template)?,
            classifier,
            min_score,
        })
    }

    /// The columns the template reads: a data file must have them.
    pub fn columns(&self) -> Vec<&str> {
        self.template.columns()
    }

    /// Every tagged span of `paper` as (normalised keyword, mean probability of its tags), the
    /// best score of each keyword, best first.
    pub fn candidates(&self, paper: &Paper) -> Result<Vec<(String, f64)>> {
        let text = self
            .template
            .render(|column| paper.field(column))
            .map_err(|e| Error::Config(e.to_string()))?;
        let (ids, offsets) = self.classifier.tokenizer.encode_with_offsets(&text)?;
        let n = ids.len();
        let encoded = EncodedBatch {
            input_ids: ids,
            attention_mask: vec![1; n],
            token_type_ids: vec![0; n],
            batch: 1,
            seq_len: n,
        };
        let logits = graft_model::ops::without_grad(|| self.classifier.forward(&encoded))?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?;
        let probs = graft_model::ops::reference::softmax_last_dim(&logits)?;
        let best = probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let best_prob = probs.max(D::Minus1)?.to_vec1::<f32>()?;
        let labels = &self.classifier.labels;
        let tags: Vec<Option<Tag>> = best
            .iter()
            .zip(&offsets)
            .map(|(&b, offset)| offset.and_then(|_| labels.label(b as usize).and_then(Tag::parse)))
            .collect();
        let mut found: Vec<(String, f64)> = Vec::new();
        for (first, end, _) in entities(&tags) {
            let (Some((start, _)), Some((_, stop))) = (offsets[first], offsets[end - 1]) else {
                continue;
            };
            let keyword = normalise(&text[start..stop]);
            if keyword.is_empty() {
                continue;
            }
            let span = &best_prob[first..end];
            let score = span.iter().map(|&p| p as f64).sum::<f64>() / span.len() as f64;
            match found.iter_mut().find(|(k, _)| *k == keyword) {
                Some((_, best)) => *best = best.max(score),
                None => found.push((keyword, score)),
            }
        }
        found.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(found)
    }
}

impl KeywordExtractor for TaggingExtractor {
    fn name(&self) -> &str {
        "tagging"
    }

    fn extract(&self, paper: &Paper) -> Result<Vec<String>> {
        Ok(self
            .candidates(paper)?
            .into_iter()
            .filter(|(_, score)| *score >= self.min_score)
            .map(|(keyword, _)| keyword)
            .collect())
    }
}
