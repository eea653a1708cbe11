//! Token classification as the training loop ([`crate::fit`]) drives it: a [`Classifier`]
//! whose pooling is [`Pooling::Tokens`], its rows labelled per token ([`crate::tagging`]),
//! the loss the mean cross-entropy over labelled tokens, evaluated by entity-level F1
//! ([`crate::metrics::evaluate_tagging`]), the best adapter by that F1.
use crate::config::TrainSection;
use crate::fit;
use crate::metrics::{evaluate_tagging, TaggingEvaluation};
use crate::optim::ParamGroup;
use crate::run::RunDir;
use crate::tagging::{label_tokens, LabelledTokens, TaggedRow, IGNORED};
use crate::task::Classifier;
use crate::{Error, Result};
use graft_model::models::bert::Pooling;
use graft_tokenizer::{EncodedBatch, Tag};

/// Labelled rows padded into one batch: ids, mask and token types as the classifier reads
/// them, and per position the label index or [`IGNORED`] (special tokens and padding).
pub struct TagBatch {
    pub encoded: EncodedBatch,
    pub labels: Vec<i64>,
}

/// Pads `rows` on the right with `pad_id` (labels with [`IGNORED`]).
pub fn pad(rows: &[&LabelledTokens], pad_id: u32) -> TagBatch {
    let seq_len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let mut encoded = EncodedBatch {
        input_ids: Vec::with_capacity(rows.len() * seq_len),
        attention_mask: Vec::with_capacity(rows.len() * seq_len),
        token_type_ids: vec![0; rows.len() * seq_len],
        batch: rows.len(),
        seq_len,
    };
    let mut labels = Vec::with_capacity(rows.len() * seq_len);
    for row in rows {
        let padding = seq_len - row.ids.len();
        encoded.input_ids.extend(&row.ids);
        encoded
            .input_ids
            .extend(std::iter::repeat_n(pad_id, padding));
        encoded
            .attention_mask
            .extend(std::iter::repeat_n(1, row.ids.len()));
        encoded
            .attention_mask
            .extend(std::iter::repeat_n(0, padding));
        labels.extend(&row.labels);
        labels.extend(std::iter::repeat_n(IGNORED, padding));
    }
    TagBatch { encoded, labels }
}

/// The tagging task: a token classifier and its training and held-out rows, tokenized.
pub struct TaggerTask {
    pub classifier: Classifier,
    train: Vec<LabelledTokens>,
    held_out: Vec<LabelledTokens>,
    eval_batch_size: usize,
    data: fit::DataIdentity,
}

impl TaggerTask {
    /// Labels `train` and `held_out` with the classifier's tokenizer and label set. The
    /// classifier must label tokens ([`Pooling::Tokens`]).
    pub fn new(
        classifier: Classifier,
        train: &[TaggedRow],
        held_out: &[TaggedRow],
        eval_batch_size: usize,
        fields: serde_json::Value,
    ) -> Result<Self> {
        if classifier.spec.pooling != Pooling::Tokens {
            return Err(Error::Config(
                "a tagging task needs a token classifier (model.pooling = \"tokens\")".into(),
            ));
        }
        let label = |rows: &[TaggedRow]| -> Result<Vec<LabelledTokens>> {
            rows.iter()
                .map(|row| label_tokens(&classifier.tokenizer, &classifier.labels, row))
                .collect()
        };
        let (train_rows, held_out_rows) = (label(train)?, label(held_out)?);
        let mut hasher = fit::DataHasher::default();
        for row in train.iter().chain(held_out) {
            hasher.part(row.text.as_bytes()).number(row.spans.len());
            for span in &row.spans {
                hasher
                    .number(span.start)
                    .number(span.end)
                    .part(span.kind.as_bytes());
            }
        }
        Ok(Self {
            data: fit::DataIdentity {
                fields,
                train_examples: train.len(),
                held_out_examples: held_out.len(),
                content_sha256: hasher.finish(),
            },
            classifier,
            train: train_rows,
            held_out: held_out_rows,
            eval_batch_size,
        })
    }

    /// Logits `[batch, tokens, labels]` of a padded batch, with the adapter's hooks.
    fn logits(&self, batch: &TagBatch) -> Result<candle_core::Tensor> {
        let inputs = self.classifier.inputs(&batch.encoded)?;
        Ok(self
            .classifier
            .model
            .forward(&inputs, self.classifier.hooks())?)
    }

    /// The held-out rows' scores: entity-level precision, recall and F1, token accuracy.
    pub fn evaluate_held_out(&self) -> Result<TaggingEvaluation> {
        let tag_of = |index: i64| -> Option<Tag> {
            (index != IGNORED)
                .then(|| self.classifier.labels.label(index as usize))
                .flatten()
                .and_then(Tag::parse)
        };
        let (mut gold, mut predicted) = (Vec::new(), Vec::new());
        let pad_id = self.classifier.tokenizer.pad_id();
        for rows in self.held_out.chunks(self.eval_batch_size.max(1)) {
            let refs: Vec<&LabelledTokens> = rows.iter().collect();
            let batch = pad(&refs, pad_id);
            let logits = graft_model::ops::without_grad(|| self.logits(&batch))?;
            let best = logits
                .argmax(candle_core::D::Minus1)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            let t = batch.encoded.seq_len;
            for (i, row) in rows.iter().enumerate() {
                let n = row.ids.len();
                gold.push(row.labels.iter().map(|&l| tag_of(l)).collect());
                predicted.push(
                    best[i * t..i * t + n]
                        .iter()
                        .map(|&p| tag_of(p as i64))
                        .collect(),
                );
            }
        }
        Ok(evaluate_tagging(&gold, &predicted))
    }
}

impl fit::Task for TaggerTask {
    type Batch = TagBatch;

    fn examples(&self) -> usize {
        self.train.len()
    }

    fn batch(&self, rows: &[usize]) -> Result<TagBatch> {
        let refs: Vec<&LabelledTokens> = rows.iter().map(|&i| &self.train[i]).collect();
        Ok(pad(&refs, self.classifier.tokenizer.pad_id()))
    }

    fn tokens(&self, batch: &TagBatch) -> usize {
        batch.encoded.batch * batch.encoded.seq_len
    }

    fn units(&self, batch: &TagBatch) -> usize {
        batch.labels.iter().filter(|&&l| l != IGNORED).count()
    }

    fn accumulation(&self) -> fit::Accumulation {
        fit::Accumulation::ByUnits
    }

    fn loss_and_grads(
        &self,
        batch: &TagBatch,
        share: fit::Share,
    ) -> Result<(f64, candle_core::backprop::GradStore)> {
        let inputs = self.classifier.inputs(&batch.encoded)?;
        let logits = self
            .classifier
            .model
            .forward(&inputs, self.classifier.adapter.as_ref())?;
        // Per-position cross-entropy over the labelled tokens: the causal LM's loss, unshifted.
        let mut loss = graft_model::loss::causal_lm_loss(&logits, &batch.labels)?;
        if let Some(extra) = self.classifier.adapter.extra_loss()? {
            loss = (loss + extra)?;
        }
        let loss = share.weigh(&loss)?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok((value, loss.backward()?))
    }

    fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.classifier.trainable()
    }

    fn param_groups(&self, t: &TrainSection) -> Vec<ParamGroup> {
        let vars = |named: Vec<(String, candle_core::Var)>| named.into_iter().map(|(_, v)| v);
        vec![
            ParamGroup {
                vars: vars(self.classifier.adapter.trainable()).collect(),
                lr: t.lr,
                weight_decay: t.weight_decay,
            },
            ParamGroup {
                vars: vars(self.classifier.head_vars()).collect(),
                lr: t.head_lr.unwrap_or(t.lr),
                weight_decay: t.weight_decay,
            },
        ]
    }

    fn adapter(&self) -> &dyn graft_peft::Adapter {
        self.classifier.adapter.as_ref()
    }

    fn adapter_mut(&mut self) -> &mut dyn graft_peft::Adapter {
        self.classifier.adapter.as_mut()
    }

    fn evaluate(&mut self) -> Result<Option<fit::Scored>> {
        if self.held_out.is_empty() {
            return Ok(None);
        }
        let e = self.evaluate_held_out()?;
        Ok(Some(fit::Scored {
            summary: format!(
                "held-out entity precision {:.4}  recall {:.4}  F1 {:.4}  token accuracy {:.4}",
                e.precision, e.recall, e.f1, e.token_accuracy
            ),
            score: e.f1,
            curve: ("held-out entity F1", e.f1),
            metrics: serde_json::to_value(&e).map_err(|e| Error::Config(e.to_string()))?,
        }))
    }

    fn save(&self, run: &RunDir) -> Result<()> {
        self.classifier.save(&run.adapter_dir())
    }

    fn data_identity(&self) -> Result<fit::DataIdentity> {
        Ok(self.data.clone())
    }
}
