//! The check on a token classifier (MiniLM, `Pooling::Tokens`): every method trains on a small
//! tagging set (the challenge's keywords marked in title and abstract), every trainable tensor
//! receives a gradient, and the saved adapter reloads to the same logits and predictions.
use crate::fixtures::{registry_of, spec, workspace_root};
use crate::training::{judge_training, train_loop};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use graft_model::models::bert::Pooling;
use graft_peft::Method;
use graft_tokenizer::Template;
use graft_trainer::data::Dataset;
use graft_trainer::tag_train::{pad, TagBatch};
use graft_trainer::tagging::{label_tokens, mark_rows, LabelledTokens};
use graft_trainer::task::Classifier;

/// `count` rows of `challenge_test.csv` that are not report rows, their keywords marked in
/// title + abstract, labelled O/B/I for `classifier`, in one padded batch.
fn tagging_batch(classifier: &Classifier, count: usize) -> Result<TagBatch> {
    let path = workspace_root().join("../shared/data/abstracts/challenge_test.csv");
    let data = Dataset::read_csv(&path, &["title", "abstract", "Keywords"])?;
    let template = Template::parse("{title}\n{abstract}")?;
    let marking = mark_rows(&data, &template, "Keywords", "")?;
    let rows: Vec<LabelledTokens> = marking
        .rows
        .iter()
        .enumerate()
        // Every 5th row (0-based) is a report row, never trained on.
        .filter(|(i, row)| i % 5 != 0 && !row.spans.is_empty())
        .map(|(_, row)| label_tokens(&classifier.tokenizer, &classifier.labels, row))
        .filter(|labelled| {
            labelled
                .as_ref()
                .map_or(true, |l| l.labels.iter().any(|&x| x > 0))
        })
        .take(count)
        .collect::<graft_trainer::Result<_>>()?;
    let refs: Vec<&LabelledTokens> = rows.iter().collect();
    Ok(pad(&refs, classifier.tokenizer.pad_id()))
}

/// A fresh token classifier (labels O, B, I; 96 tokens) with `method` on MiniLM.
fn token_classifier(
    method: &dyn Method,
    settings: &serde_json::Value,
    seed: u64,
) -> Result<Classifier> {
    let mut task = spec(method.name(), 96)?;
    task.pooling = Pooling::Tokens;
    task.labels = vec!["O".into(), "B".into(), "I".into()];
    Ok(Classifier::create(
        task,
        method,
        settings,
        &Device::Cpu,
        DType::F32,
        seed,
        100,
    )?)
}

/// `method` trains as a token classifier: `steps` AdamW steps at `lr` on 4 tagged abstracts
/// lower the loss by 10 % with every trainable tensor (the head's too) receiving a gradient at
/// the last step; saved and reopened, the adapter gives the same logits (the fully fine-tuned
/// model within 1e-6, as [`crate::check_reload`] says why) and the same labels. Returns the
/// losses.
pub fn check_tags(
    method: &dyn Method,
    settings: &serde_json::Value,
    steps: usize,
    lr: f64,
    reopen_with: Box<dyn Method>,
) -> Result<Vec<f64>> {
    let mut classifier = token_classifier(method, settings, 7)?;
    let batch = tagging_batch(&classifier, 4)?;
    let trainable = classifier.trainable();
    let (losses, silent, _) = train_loop(
        &mut classifier,
        &trainable,
        |c| {
            let logits = c.forward(&batch.encoded)?;
            Ok(graft_model::loss::causal_lm_loss(&logits, &batch.labels)?)
        },
        |c| c.adapter.as_mut(),
        steps,
        lr,
    )?;
    let name = method.name();
    judge_training(&format!("{name} tagging tokens"), &losses, &silent)?;
    classifier.adapter.set_training(false);
    let before = classifier.forward(&batch.encoded)?;
    let dir = crate::fixtures::scratch_dir()?;
    classifier.save(dir.path())?;
    let config = std::fs::read_to_string(dir.path().join("adapter_config.json")).ok();
    if let Some(config) = config {
        if !config.contains("\"TOKEN_CLS\"") {
            return Err(Error::Check(format!(
                "{name}: adapter_config.json does not say TOKEN_CLS: {config}"
            )));
        }
    }
    let reloaded = Classifier::open(dir.path(), &registry_of(reopen_with)?, &Device::Cpu)?;
    let after = reloaded.forward(&batch.encoded)?;
    let diff = crate::fixtures::max_abs_diff(&before, &after)?;
    let tolerance = if method.saves_full_model() { 1e-6 } else { 0.0 };
    if diff > tolerance {
        return Err(Error::Check(format!(
            "{name}: reloaded token logits differ by {diff} (allowed {tolerance})"
        )));
    }
    let labels = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?)
    };
    if labels(&before)? != labels(&after)? {
        return Err(Error::Check(format!(
            "{name}: reloaded adapter predicts other labels"
        )));
    }
    Ok(losses)
}
