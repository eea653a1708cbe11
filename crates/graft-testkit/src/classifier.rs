//! The checks on a sequence classifier (MiniLM): gradients, training, acts_on promises,
//! reload, PEFT's fixtures and merging.
use crate::fixtures::{
    classifier, fixture_dir, max_abs_diff, randomize, real_batch, registry_of, spec,
};
use crate::gradients::{finite_difference_check, judge_gradients, GradientSample};
use crate::training::{judge_training, train_steps};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use graft_model::{Acts, Hooks, LinearSite, LowRank};
use graft_peft::Method;
use graft_trainer::task::Classifier;

/// The gradient check every method passes: an f64 classifier (`prepare` may randomise
/// zero-initialised tensors), central differences at `per_tensor` entries of every tensor of
/// the method (the head excluded) against autograd, relative error at most 1e-3.
pub fn check_gradients(
    method: &dyn Method,
    settings: &serde_json::Value,
    per_tensor: usize,
    prepare: impl Fn(&Classifier) -> Result<()>,
) -> Result<Vec<GradientSample>> {
    let classifier = classifier(method, settings, DType::F64, 24, 7)?;
    prepare(&classifier)?;
    let method_keys: Vec<String> = classifier
        .adapter
        .trainable()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    if method_keys.is_empty() {
        return Err(Error::Check(format!("{} trains no tensor", method.name())));
    }
    let (texts, labels) = real_batch(2)?;
    let samples = finite_difference_check(
        &classifier,
        &texts,
        &labels,
        |name| method_keys.iter().any(|k| k == name),
        per_tensor,
        1e-5,
        11,
    )?;
    judge_gradients(method.name(), &samples, method_keys.len() * per_tensor)?;
    Ok(samples)
}

/// The training check every method passes: `steps` AdamW steps at `lr` on 8 real rows lower
/// the loss by at least 10%, and at the last step every trainable tensor has a non-zero
/// gradient. Returns the losses.
pub fn check_trains(
    method: &dyn Method,
    settings: &serde_json::Value,
    steps: usize,
    lr: f64,
) -> Result<Vec<f64>> {
    let mut classifier = classifier(method, settings, DType::F32, 64, 1)?;
    let (texts, labels) = real_batch(8)?;
    let (losses, silent) = train_steps(&mut classifier, &texts, &labels, steps, lr)?;
    judge_training(method.name(), &losses, &silent)?;
    Ok(losses)
}

/// What [`check_reload`] leaves for further checks (e.g. merging).
pub struct Reloaded {
    pub classifier: Classifier,
    pub texts: Vec<String>,
    /// Logits of the trained classifier before saving.
    pub logits: Tensor,
}

/// The adapter's hooks, saying that they may act on every linear site: the model then runs
/// every site op by op and calls every hook there.
struct ActsEverywhere<'a>(&'a dyn Hooks);

impl Hooks for ActsEverywhere<'_> {
    fn acts_on(&self, _site: &str) -> Acts {
        Acts::Any
    }
    fn linear_input(
        &self,
        site: &LinearSite<'_>,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.0.linear_input(site, x)
    }
    fn low_rank(&self, site: &LinearSite<'_>, x: &Tensor) -> candle_core::Result<Option<LowRank>> {
        self.0.low_rank(site, x)
    }
    fn linear(
        &self,
        site: &LinearSite<'_>,
        x: &Tensor,
        base: Tensor,
    ) -> candle_core::Result<Tensor> {
        self.0.linear(site, x, base)
    }
    fn prompt(&self, batch: usize) -> candle_core::Result<Option<Tensor>> {
        self.0.prompt(batch)
    }
    fn kv_prefix_len(&self) -> usize {
        self.0.kv_prefix_len()
    }
    fn kv_prefix(
        &self,
        layer: usize,
        batch: usize,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        self.0.kv_prefix(layer, batch)
    }
    fn parameter(&self, key: &str) -> Option<Tensor> {
        self.0.parameter(key)
    }
}

/// A method's [`Hooks::acts_on`] promises hold: with its tensors set at random (so that none
/// sits at an identity), the model's logits with its sites fused where the method allows are
/// those of every site run op by op, within float rounding. Returns the largest difference.
pub fn check_acts_on(method: &dyn Method, settings: &serde_json::Value) -> Result<f64> {
    let classifier = classifier(method, settings, DType::F32, 64, 3)?;
    let keys: Vec<String> = classifier
        .adapter
        .trainable()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    randomize(&classifier, |name| keys.iter().any(|k| k == name), 0.1, 17)?;
    let (texts, _) = real_batch(4)?;
    let fused = classifier.logits(&texts)?;
    let encoded = classifier.tokenizer.encode_batch(&texts)?;
    let inputs = classifier.inputs(&encoded)?;
    let op_by_op = classifier
        .model
        .forward(&inputs, &ActsEverywhere(classifier.hooks()))?;
    let diff = max_abs_diff(&fused, &op_by_op)?;
    if diff > 1e-4 {
        return Err(Error::Check(format!(
            "{}: logits with the sites its acts_on leaves to fusion differ by {diff} from op-by-op ones: a hook acts where acts_on says it does not",
            method.name()
        )));
    }
    Ok(diff)
}

/// The persistence check every method passes: train 3 steps, save, reopen through a registry
/// holding `reopen_with`, and get bit-identical logits (within 1e-6 for a full model, see
/// below); on the way, [`check_acts_on`].
pub fn check_reload(
    method: &dyn Method,
    settings: &serde_json::Value,
    reopen_with: Box<dyn Method>,
) -> Result<Reloaded> {
    let mut classifier = classifier(method, settings, DType::F32, 64, 5)?;
    let (texts, labels) = real_batch(4)?;
    train_steps(&mut classifier, &texts, &labels, 3, 1e-2)?;
    check_acts_on(method, settings)?;
    let logits = classifier.logits(&texts)?;
    let dir = crate::fixtures::scratch_dir()?;
    classifier.save(dir.path())?;
    let reloaded = Classifier::open(dir.path(), &registry_of(reopen_with)?, &Device::Cpu)?;
    let after = reloaded.logits(&texts)?;
    let diff = max_abs_diff(&logits, &after)?;
    // A fully fine-tuned model trains with its query, key and value projected apart (trained
    // weights) and reopens frozen, projecting them as one packed product. The gemm crate gives
    // the packed columns bit for bit; OpenBLAS need not (measured: 6e-8 on an AMD EPYC with
    // its Haswell kernels). Every other method reopens onto the same kernels: bit-identical.
    let tolerance = if method.saves_full_model() { 1e-6 } else { 0.0 };
    if diff > tolerance {
        return Err(Error::Check(format!(
            "{}: reloaded logits differ by {diff} (allowed {tolerance})",
            method.name()
        )));
    }
    Ok(Reloaded {
        classifier: reloaded,
        texts,
        logits,
    })
}

/// The interop check: the PEFT-written adapter in `../shared/fixtures/{fixture}` loads with
/// `method` and reproduces its `expected_logits.json` within 1e-4, and the adapter matters
/// at that tolerance (the saved head without the adapter is more than 1e-3 away). Returns the
/// largest difference.
pub fn check_peft_fixture(method: Box<dyn Method>, fixture: &str) -> Result<f64> {
    let dir = fixture_dir(fixture);
    let path = dir.join("expected_logits.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let expected: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Check(format!("{}: {e}", path.display())))?;
    let name = method.name().to_string();
    let registry = registry_of(method)?;
    let classifier = Classifier::open_with_spec(&dir, spec(&name, 32)?, &registry, &Device::Cpu)?;
    let matrix = |value: &serde_json::Value, what: &str| -> Result<Tensor> {
        let rows: Vec<Vec<f64>> = serde_json::from_value(value.clone())
            .map_err(|e| Error::Check(format!("{}: `{what}`: {e}", path.display())))?;
        Ok(Tensor::new(rows, &Device::Cpu)?)
    };
    let ids =
        |key: &str| -> Result<Tensor> { Ok(matrix(&expected[key], key)?.to_dtype(DType::U32)?) };
    let inputs = graft_model::models::bert::Inputs {
        input_ids: ids("input_ids")?,
        attention_mask: ids("attention_mask")?,
        token_type_ids: Some(ids("token_type_ids")?),
    };
    let logits = classifier.model.forward(&inputs, classifier.hooks())?;
    let want = matrix(&expected["logits"], "logits")?.to_dtype(logits.dtype())?;
    let diff = max_abs_diff(&logits, &want)?;
    if diff > 1e-4 {
        return Err(Error::Check(format!(
            "{fixture}: logits {logits} differ from PEFT's by {diff}"
        )));
    }
    let without = matrix(
        &expected["diagnostics"]["logits_if_adapter_ignored_but_saved_head_used"],
        "diagnostics.logits_if_adapter_ignored_but_saved_head_used",
    )?
    .to_dtype(logits.dtype())?;
    if max_abs_diff(&logits, &without)? <= 1e-3 {
        return Err(Error::Check(format!(
            "{fixture}: the adapter changes the logits by less than 1e-3, the check proves nothing"
        )));
    }
    Ok(diff)
}

/// The merge check of mergeable methods, on what [`check_reload`] left: merged into the base
/// weights, the model gives the adapter's logits within `tolerance`, and unmerging restores
/// them. Returns the merged difference.
pub fn check_merge(reloaded: &mut Reloaded, tolerance: f64) -> Result<f64> {
    let classifier = &mut reloaded.classifier;
    classifier.set_merged(true)?;
    let merged = max_abs_diff(&reloaded.logits, &classifier.logits(&reloaded.texts)?)?;
    classifier.set_merged(false)?;
    let unmerged = max_abs_diff(&reloaded.logits, &classifier.logits(&reloaded.texts)?)?;
    if merged > tolerance || unmerged > tolerance {
        return Err(Error::Check(format!(
            "merged logits differ by {merged}, unmerged by {unmerged} (tolerance {tolerance})"
        )));
    }
    Ok(merged)
}
