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
    /// How the run's phrases were marked, for train.json.
    pub marking: Option<MarkingReport>,
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
            marking: None,
        })
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
            let logits =
                graft_model::ops::without_grad(|| self.classifier.forward(&batch.encoded))?;
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
        let logits = self.classifier.forward(&batch.encoded)?;
        // Per-position cross-entropy over the labelled tokens: the causal LM's loss, unshifted.
        let loss = graft_model::loss::causal_lm_loss(&logits, &batch.labels)?;
        self.classifier.weighed_grads(loss, share)
    }

    fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.classifier.trainable()
    }

    fn param_groups(&self, t: &TrainSection) -> Vec<ParamGroup> {
        self.classifier.param_groups(t)
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

    fn report(&self, _state: &fit::LoopState, report: &mut serde_json::Value) {
        report["split"] = serde_json::json!("held-out rows");
        report["method"] = serde_json::json!(self.classifier.spec.method);
        report["trainable_params"] =
            serde_json::json!(fit::value_count(&self.classifier.trainable()));
        if let Some(marking) = &self.marking {
            report["marking"] = serde_json::json!(marking);
        }
    }
}

/// What a token-classification run ends with: where, its best held-out scores and when, and
/// how many phrases could not be marked.
pub struct TagOutcome {
    pub run_dir: std::path::PathBuf,
    pub best: TaggingEvaluation,
    pub best_step: usize,
    pub steps: usize,
    pub marking: MarkingReport,
}

/// How the data's phrases were marked (in train.json as `marking`): none is dropped silently.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MarkingReport {
    pub rows: usize,
    pub phrases: usize,
    /// Phrases marked nowhere in their row's text.
    pub unmatched: usize,
    /// Rows with no phrase marked (trained on as all `O`).
    pub rows_without_spans: usize,
    /// Spans that truncation to `model.max_len` cut, wholly or in part.
    pub spans_cut: usize,
    /// The first unmatched phrases with their rows, for a look.
    pub unmatched_examples: Vec<(usize, String)>,
}

impl std::fmt::Display for MarkingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} marked in {} rows ({} unmatched, {} rows without any, {} spans cut by \
             max_len)",
            self.phrases - self.unmatched,
            self.phrases,
            self.rows,
            self.unmatched,
            self.rows_without_spans,
            self.spans_cut
        )
    }
}

/// A tagging run's rows, split, and step count, from a resolved config.
struct TagPlan {
    spec: crate::task::TaskSpec,
    train: Vec<TaggedRow>,
    held_out: Vec<TaggedRow>,
    marking: crate::tagging::Marking,
    total: usize,
}

impl TagPlan {
    fn new(config: &crate::TrainConfig) -> Result<Self> {
        config.validate()?;
        let (model_dir, data_path) = config.model_and_data()?;
        let column = config
            .data
            .phrase_column
            .clone()
            .ok_or_else(|| Error::Config("a tagging run needs data.phrase_column".into()))?;
        let spec = crate::task::TaskSpec::from_config(config, config.method_name()?, model_dir);
        let template = graft_tokenizer::Template::parse(&spec.template)?;
        let mut required = template.columns();
        required.push(&column);
        let data = crate::data::Dataset::read(&data_path, &required)?;
        let marking = crate::tagging::mark_rows(&data, &template, &column, "")?;
        let every_row = vec![0; marking.rows.len()];
        let (train_idx, held_idx) = crate::data::stratified_split(
            &every_row,
            1,
            config.data.val_fraction,
            config.train.seed,
        )?;
        let pick = |idx: &[usize]| idx.iter().map(|&i| marking.rows[i].clone()).collect();
        let train: Vec<TaggedRow> = pick(&train_idx);
        let total = config.train.total_steps(train.len());
        Ok(Self {
            spec,
            held_out: pick(&held_idx),
            train,
            marking,
            total,
        })
    }
}

/// Trains the token classifier `config` describes (`model.pooling = "tokens"`,
/// `data.phrase_column`) with the method plugin from `registry`, writing the run into `out`.
pub fn train(
    config: &crate::TrainConfig,
    registry: &graft_peft::loader::Registry,
    model_dir: &std::path::Path,
    data_path: &std::path::Path,
    out: &std::path::Path,
) -> Result<TagOutcome> {
    let resolved = config.resolved(model_dir, data_path)?;
    let plan = TagPlan::new(&resolved)?;
    let classifier = crate::train::new_classifier(&plan.spec, &resolved, registry, plan.total)?;
    let run = RunDir::create(out, RunDir::ADAPTER)?;
    run.write(RunDir::CONFIG, &resolved.to_toml()?)?;
    run_loop(&resolved, classifier, plan, run, None)
}

/// Continues the tagging run in `dir` from its newest checkpoint.
pub fn resume(
    dir: &std::path::Path,
    registry: &graft_peft::loader::Registry,
) -> Result<TagOutcome> {
    let config = crate::TrainConfig::from_file(&dir.join(RunDir::CONFIG))?;
    let plan = TagPlan::new(&config)?;
    let checkpoint = fit::latest_checkpoint(dir)?;
    let classifier = crate::train::new_classifier(&plan.spec, &config, registry, plan.total)?;
    let run = RunDir::reopen(dir, checkpoint.state.done)?;
    run_loop(&config, classifier, plan, run, Some(checkpoint))
}

fn run_loop(
    config: &crate::TrainConfig,
    classifier: Classifier,
    plan: TagPlan,
    mut run: RunDir,
    resume_from: Option<crate::checkpoint::Checkpoint<fit::LoopState>>,
) -> Result<TagOutcome> {
    let t = &config.train;
    let mut fields = serde_json::json!({});
    fit::DataIdentity::fields("data", &config.data, &mut fields)?;
    let mut task = TaggerTask::new(
        classifier,
        &plan.train,
        &plan.held_out,
        t.eval_batch_size,
        fields,
    )?;
    let marking = MarkingReport {
        rows: plan.marking.rows.len(),
        phrases: plan.marking.phrases,
        unmatched: plan.marking.unmatched.len(),
        rows_without_spans: plan.marking.rows_without_spans(),
        spans_cut: task.train.iter().chain(&task.held_out).map(|l| l.cut).sum(),
        unmatched_examples: plan.marking.unmatched.iter().take(20).cloned().collect(),
    };
    let intro = format!(
        "training {} to tag tokens: {} train / {} held-out rows; phrases: {marking}, max_len {}; {} \
         steps of {}",
        plan.spec.method,
        plan.train.len(),
        plan.held_out.len(),
        plan.spec.max_len,
        plan.total,
        t.batch_size * t.grad_accum,
    );
    task.marking = Some(marking.clone());
    let state = fit::fit(&mut task, t, plan.total, &mut run, resume_from, &intro)?;
    let best = state.best.ok_or_else(|| {
        Error::Config("no evaluation ran: data.val_fraction held out no row".into())
    })?;
    Ok(TagOutcome {
        run_dir: run.root.clone(),
        best: serde_json::from_value(best.metrics).map_err(|e| Error::Config(e.to_string()))?,
        best_step: best.step,
        steps: plan.total,
        marking,
    })
}
