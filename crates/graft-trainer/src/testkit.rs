//! Checks every PEFT method must pass, for plugin test suites (in-tree and third-party):
//! gradients agree with finite differences, every trainable tensor gets a gradient, the loss
//! falls on real data, a saved adapter reloads to the same logits, and the method's
//! `Hooks::acts_on` promises hold.
use crate::config::Precision;
use crate::data::Dataset;
use crate::lm::{CausalLm, LmSpec};
use crate::optim::{AdamW, ParamGroup};
use crate::task::{Classifier, TaskSpec};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use graft_model::models::bert::Pooling;
use graft_model::{Acts, Hooks, LinearSite, LowRank};
use graft_peft::loader::{LoadedPlugin, Registry};
use graft_peft::Method;
use graft_tokenizer::{
    encode_causal, CausalBatch, ChatTemplate, LabelSet, PromptResponse, Template, DEFAULT_TEMPLATE,
};
use rand::Rng;
use std::path::{Path, PathBuf};

/// The workspace root (this crate lives in `crates/graft-trainer`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// all-MiniLM-L6-v2, fetched on first use.
pub fn minilm_dir() -> Result<PathBuf> {
    Ok(graft_model::zoo::MINILM.ensure(&mut |m| eprintln!("{m}"))?)
}

/// Real labelled rows: the challenge substitute beside the checkout, else the demo set.
pub fn real_data_path() -> PathBuf {
    let shared = workspace_root().join("../shared/data/abstracts/train.csv");
    if shared.is_file() {
        shared
    } else {
        workspace_root().join("data/demo.csv")
    }
}

pub fn spec(method: &str, max_len: usize) -> Result<TaskSpec> {
    Ok(TaskSpec {
        method: method.into(),
        model_dir: minilm_dir()?,
        labels: vec!["0".into(), "1".into()],
        label_column: "label".into(),
        template: DEFAULT_TEMPLATE.into(),
        pooling: Pooling::Pooler,
        max_len,
        tokenizer: None,
    })
}

/// `count` rows of the real data, alternating the two classes, as (texts, labels).
pub fn real_batch(count: usize) -> Result<(Vec<String>, Vec<usize>)> {
    let data = Dataset::read_csv(&real_data_path(), &["title", "abstract", "label"])?;
    let template = Template::parse(DEFAULT_TEMPLATE)?;
    let labels = data.labels("label", &LabelSet::new(vec!["0".into(), "1".into()])?)?;
    let texts = data.texts(&template)?;
    let mut picked = (Vec::new(), Vec::new());
    for class in [0, 1].iter().cycle().take(count) {
        let already = picked.1.iter().filter(|&&l| l == *class).count();
        let index = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == *class)
            .nth(already)
            .map(|(i, _)| i)
            .ok_or_else(|| Error::Config("not enough rows of each class".into()))?;
        picked.0.push(texts[index].clone());
        picked.1.push(*class);
    }
    Ok(picked)
}

/// Task loss (cross-entropy plus the method's extra term) of `texts`.
pub fn loss(classifier: &Classifier, texts: &[String], labels: &[usize]) -> Result<Tensor> {
    let device = classifier.model.head().device().clone();
    let targets = Tensor::from_iter(labels.iter().map(|&l| l as u32), &device)?;
    let logits = classifier.logits(texts)?;
    let mut loss = graft_model::loss::cross_entropy(&logits, &targets)?;
    if let Some(extra) = classifier.adapter.extra_loss()? {
        loss = (loss + extra)?;
    }
    Ok(loss)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// One sampled comparison of autograd against central differences.
#[derive(Debug)]
pub struct GradientSample {
    pub tensor: String,
    pub index: usize,
    pub autograd: f64,
    pub numeric: f64,
}

impl GradientSample {
    pub fn relative_error(&self) -> f64 {
        let scale = self.autograd.abs().max(self.numeric.abs()).max(1e-7);
        (self.autograd - self.numeric).abs() / scale
    }
}

/// Sets one entry of `var` in place, touching only its row (tables can be large).
fn set_entry(var: &Var, index: usize, value: f64) -> Result<()> {
    let dims = var.dims();
    let row_len: usize = dims.iter().skip(1).product();
    let (row, col) = (index / row_len, index % row_len);
    let slab = var.as_tensor().narrow(0, row, 1)?;
    let mut values = slab.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    values[col] = value;
    let t = Tensor::from_vec(values, slab.shape(), var.device())?.to_dtype(var.dtype())?;
    Ok(var.as_tensor().slice_set(&t, 0, row)?)
}

/// Compares autograd with central differences (step `eps`) at `per_tensor` random entries of
/// every tensor whose name `select` accepts. Run it on an f64 classifier.
pub fn finite_difference_check(
    classifier: &Classifier,
    texts: &[String],
    labels: &[usize],
    select: impl Fn(&str) -> bool,
    per_tensor: usize,
    eps: f64,
    seed: u64,
) -> Result<Vec<GradientSample>> {
    finite_differences(
        &classifier.trainable(),
        &|| loss(classifier, texts, labels),
        select,
        per_tensor,
        eps,
        seed,
    )
}

/// The core of the gradient checks: `loss` is evaluated with entries of `trainable` moved.
fn finite_differences(
    trainable: &[(String, Var)],
    loss: &dyn Fn() -> Result<Tensor>,
    select: impl Fn(&str) -> bool,
    per_tensor: usize,
    eps: f64,
    seed: u64,
) -> Result<Vec<GradientSample>> {
    let grads = loss()?.backward()?;
    let mut rng = graft_model::init::seeded_rng(seed);
    let mut samples = Vec::new();
    for (name, var) in trainable.iter().filter(|(n, _)| select(n)) {
        let grad = grads
            .get(var.as_tensor())
            .ok_or_else(|| Error::Config(format!("{name} received no gradient")))?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let values = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        for _ in 0..per_tensor {
            let index = rng.random_range(0..values.len());
            set_entry(var, index, values[index] + eps)?;
            let plus = scalar(&loss()?)?;
            set_entry(var, index, values[index] - eps)?;
            let minus = scalar(&loss()?)?;
            set_entry(var, index, values[index])?;
            samples.push(GradientSample {
                tensor: name.clone(),
                index,
                autograd: grad[index],
                numeric: (plus - minus) / (2.0 * eps),
            });
        }
    }
    Ok(samples)
}

/// Trains `steps` AdamW steps on one real batch; returns the losses and the names of
/// trainable tensors whose gradient was missing or all zero at the last step.
pub fn train_steps(
    classifier: &mut Classifier,
    texts: &[String],
    labels: &[usize],
    steps: usize,
    lr: f64,
) -> Result<(Vec<f64>, Vec<String>)> {
    let trainable = classifier.trainable();
    let (losses, silent, _) = train_loop(
        classifier,
        &trainable,
        |c| loss(c, texts, labels),
        |c| c.adapter.as_mut(),
        steps,
        lr,
    )?;
    Ok((losses, silent))
}

/// The core of the training checks, for any model `T` holding an adapter.
fn train_loop<T>(
    model: &mut T,
    trainable: &[(String, Var)],
    loss: impl Fn(&T) -> Result<Tensor>,
    adapter: impl Fn(&mut T) -> &mut dyn graft_peft::Adapter,
    steps: usize,
    lr: f64,
) -> Result<(Vec<f64>, Vec<String>, AdamW)> {
    let vars: Vec<Var> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(
        vec![ParamGroup {
            vars,
            lr,
            weight_decay: 0.0,
        }],
        0.9,
        0.999,
        1e-8,
    )?;
    adapter(model).set_training(true);
    let mut losses = Vec::new();
    let mut silent = Vec::new();
    for step in 0..steps {
        let loss = loss(model)?;
        losses.push(scalar(&loss)?);
        let grads = loss.backward()?;
        silent.clear();
        for (name, var) in trainable {
            let nonzero = match grads.get(var.as_tensor()) {
                Some(g) => scalar(&g.abs()?.sum_all()?)? > 0.0,
                None => false,
            };
            if !nonzero {
                silent.push(name.clone());
            }
        }
        optimizer.step(&grads, 1.0)?;
        adapter(model).after_step(step + 1, &grads)?;
    }
    adapter(model).set_training(false);
    Ok((losses, silent, optimizer))
}

/// Largest absolute difference between two tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    scalar(&(a - b)?.abs()?.flatten_all()?.max(0)?)
}

/// A fresh classifier with `method` on MiniLM, attached for a training run of 100 steps.
pub fn classifier(
    method: &dyn Method,
    settings: &serde_json::Value,
    dtype: DType,
    max_len: usize,
    seed: u64,
) -> Result<Classifier> {
    Classifier::create(
        spec(method.name(), max_len)?,
        method,
        settings,
        &Device::Cpu,
        dtype,
        seed,
        100,
    )
}

/// Sets every trainable tensor whose key `select` accepts to normal(0, `std`) values: methods
/// that start a factor at zero (LoRA's B, AdaLoRA's E) leave the other factor without gradient
/// until it moves, which a gradient check must not mistake for agreement.
pub fn randomize(
    classifier: &Classifier,
    select: impl Fn(&str) -> bool,
    std: f64,
    seed: u64,
) -> Result<()> {
    randomize_vars(&classifier.trainable(), select, std, seed)
}

/// [`randomize`] for any set of trainable tensors.
pub fn randomize_vars(
    trainable: &[(String, Var)],
    select: impl Fn(&str) -> bool,
    std: f64,
    seed: u64,
) -> Result<()> {
    let mut rng = graft_model::init::seeded_rng(seed);
    for (name, var) in trainable {
        if select(name) {
            let dtype = var.dtype();
            let device = var.device().clone();
            var.set(&graft_model::init::normal(
                &mut rng,
                var.dims(),
                std,
                dtype,
                &device,
            )?)?;
        }
    }
    Ok(())
}

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

/// Relative error at most 1e-3 everywhere, the expected number of samples, and not all ~0.
fn judge_gradients(method: &str, samples: &[GradientSample], expected: usize) -> Result<()> {
    let wrong: Vec<String> = samples
        .iter()
        .filter(|s| s.relative_error() > 1e-3)
        .map(|s| {
            format!(
                "{} [{}]: autograd {:e} vs finite difference {:e}",
                s.tensor, s.index, s.autograd, s.numeric
            )
        })
        .collect();
    if !wrong.is_empty() {
        return Err(Error::Check(format!(
            "{method}: gradients disagree with finite differences:\n{}",
            wrong.join("\n")
        )));
    }
    if samples.len() != expected {
        return Err(Error::Check(format!(
            "{method}: sampled {} entries, expected {expected}",
            samples.len()
        )));
    }
    if !samples.iter().any(|s| s.autograd.abs() > 1e-6) {
        return Err(Error::Check(format!(
            "{method}: every sampled gradient is ~0, the check proves nothing"
        )));
    }
    Ok(())
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
    if !silent.is_empty() {
        return Err(Error::Check(format!(
            "{}: no gradient at the last step for {silent:?}",
            method.name()
        )));
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    if last >= first * 0.9 {
        return Err(Error::Check(format!(
            "{}: loss did not fall by 10%: {losses:?}",
            method.name()
        )));
    }
    Ok(losses)
}

/// A registry holding one statically linked method.
pub fn registry_of(method: Box<dyn Method>) -> Result<Registry> {
    let mut registry = Registry::default();
    registry.add(LoadedPlugin::statically_linked(method))?;
    Ok(registry)
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
    let dir = tempfile::tempdir().map_err(|e| Error::Check(format!("temporary folder: {e}")))?;
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

/// A fixture folder of `../shared/fixtures` (adapters written by Hugging Face PEFT).
pub fn fixture_dir(name: &str) -> PathBuf {
    workspace_root().join("../shared/fixtures").join(name)
}

/// The interop check: the PEFT-written adapter in `../shared/fixtures/{fixture}` loads with
/// `method` and reproduces its `expected_logits.json` within 1e-4, and the adapter matters
/// at that tolerance (the saved head without the adapter is more than 1e-3 away). Returns the
/// largest difference.
pub fn check_peft_fixture(method: Box<dyn Method>, fixture: &str) -> Result<f64> {
    let dir = fixture_dir(fixture);
    let path = dir.join("expected_logits.json");
    let text = std::fs::read_to_string(&path).map_err(crate::error::io_error(&path))?;
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

/// The decoder families every method is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// stories260K: a real, trained Llama with grouped-query attention.
    Llama,
    /// A small ChatGLM2-shaped model with random weights (no small pretrained one exists).
    ChatGlm,
    /// A small Llama with random weights whose projections all have rows a multiple of 256
    /// wide, so that q4_k keeps every one (the untied head too) in its own super-blocks.
    QuantizableLlama,
}

/// Writes [`Family::QuantizableLlama`]'s model (stories260K's vocabulary) to `dir`.
fn write_quantizable_llama(dir: &Path) -> Result<()> {
    let config_json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": false,
    });
    let config: graft_model::models::llama::Config = serde_json::from_value(config_json.clone())
        .map_err(|e| Error::Check(format!("quantizable Llama config: {e}")))?;
    Ok(graft_model::models::llama::plan(&config)?.write_random(dir, &config_json, 5)?)
}

/// stories260K's folder beside the checkout.
pub fn stories260k_dir() -> PathBuf {
    workspace_root().join("../shared/models/stories260K")
}

/// A causal-LM task on a model of `family` with stories260K's tokenizer; the ChatGLM model is
/// written under `scratch`.
pub fn lm_spec(method: &str, family: Family, scratch: &Path) -> Result<LmSpec> {
    let tokenizer = stories260k_dir().join("tokenizer.json");
    let model = match family {
        Family::Llama => stories260k_dir(),
        Family::ChatGlm => {
            let dir = scratch.join("chatglm");
            graft_model::models::chatglm::write_random(
                &dir,
                &graft_model::models::chatglm::Config::tiny(512),
                3,
            )?;
            dir
        }
        Family::QuantizableLlama => {
            let dir = scratch.join("quantizable-llama");
            write_quantizable_llama(&dir)?;
            dir
        }
    };
    Ok(LmSpec {
        method: method.into(),
        model,
        tokenizer,
        template: ChatTemplate::parse("plain")?,
        max_len: 48,
        dtype: Precision::F32,
        quantize: None,
        prompt: None,
    })
}

/// Short prompt/response pairs in stories260K's vocabulary.
pub fn story_pairs(count: usize) -> Vec<PromptResponse> {
    let pairs = [
        ("Once upon a time, there was a", " little dog named Max."),
        ("Lily liked to play in the", " park with her ball."),
        ("The sun was", " big and warm."),
        ("Tom saw a bird in the", " tree. It sang a song."),
    ];
    pairs
        .iter()
        .cycle()
        .take(count)
        .map(|(p, r)| PromptResponse {
            prompt: p.to_string(),
            response: r.to_string(),
        })
        .collect()
}

fn story_batch(lm: &CausalLm, count: usize) -> Result<CausalBatch> {
    Ok(encode_causal(
        &lm.tokenizer,
        &lm.spec.template,
        &story_pairs(count),
        lm.spec.max_len,
    )?)
}

/// The checks every method passes on a decoder family: gradients agree with central
/// differences (f64; `prepare` may randomise zero-initialised tensors), `steps` AdamW steps at
/// `lr` lower the loss (by 10% on Llama, 5% on the random ChatGLM) with a non-zero gradient for every trainable tensor at the last
/// step, and the saved adapter reopens (through `reopen_with`) to bit-identical logits.
/// Returns the training losses.
pub fn check_lm_method(
    method: &dyn Method,
    settings: &serde_json::Value,
    reopen_with: Box<dyn Method>,
    family: Family,
    (steps, lr): (usize, f64),
    prepare: impl Fn(&CausalLm) -> Result<()>,
) -> Result<Vec<f64>> {
    let scratch =
        tempfile::tempdir().map_err(|e| Error::Check(format!("temporary folder: {e}")))?;
    let spec = lm_spec(method.name(), family, scratch.path())?;
    let name = format!("{} on {family:?}", method.name());

    let lm64 = CausalLm::create(
        LmSpec {
            dtype: Precision::F64,
            ..spec.clone()
        },
        method,
        settings,
        &Device::Cpu,
        7,
        100,
    )?;
    prepare(&lm64)?;
    let keys: Vec<(String, Var)> = lm64.trainable();
    if keys.is_empty() {
        return Err(Error::Check(format!("{name} trains no tensor")));
    }
    let batch = story_batch(&lm64, 2)?;
    let per_tensor = 2;
    let samples = finite_differences(&keys, &|| lm64.loss(&batch), |_| true, per_tensor, 1e-5, 11)?;
    judge_gradients(&name, &samples, keys.len() * per_tensor)?;
    check_checkpointing(&name, &lm64, &batch)?;

    let mut lm = CausalLm::create(spec, method, settings, &Device::Cpu, 1, 100)?;
    let batch = story_batch(&lm, 4)?;
    let (losses, _) = train_lm_checked(&name, &mut lm, &batch, family, (steps, lr))?;

    let logits = lm.logits(&batch)?;
    let dir = scratch.path().join("adapter");
    lm.save(&dir)?;
    let reopened = CausalLm::open(&dir, &registry_of(reopen_with)?, &Device::Cpu)?;
    let diff = max_abs_diff(&logits, &reopened.logits(&batch)?)?;
    if diff != 0.0 {
        return Err(Error::Check(format!(
            "{name}: reopened logits differ by {diff}"
        )));
    }
    Ok(losses)
}

/// Largest difference allowed between bf16 and f32 logits, relative to the largest f32 logit:
/// bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.004 per rounding), and the
/// roundings of every layer add up in a logit that is a sum of many products. Measured over
/// every method: 0.012 to 0.038 (IA3 on stories260K the largest), 0.012 to 0.022 on the random
/// ChatGLM.
pub const BF16_LOGITS_TOLERANCE: f64 = 0.06;

/// Mixed-precision training of `method` on a bf16 base of `family`: every trainable tensor and
/// every AdamW moment is f32, the bf16 model's logits are within
/// [`BF16_LOGITS_TOLERANCE`] of the f32 model's (same adapter), and `steps` AdamW steps at
/// `lr` lower the loss as [`check_lm_method`] asks, every trainable tensor receiving a non-zero
/// gradient. Returns the losses.
pub fn check_lm_half_precision(
    method: &dyn Method,
    settings: &serde_json::Value,
    family: Family,
    (steps, lr): (usize, f64),
    prepare: impl Fn(&CausalLm) -> Result<()>,
) -> Result<Vec<f64>> {
    let scratch =
        tempfile::tempdir().map_err(|e| Error::Check(format!("temporary folder: {e}")))?;
    let spec = lm_spec(method.name(), family, scratch.path())?;
    let name = format!("{} on {family:?} in bf16", method.name());
    let open = |dtype| {
        let spec = LmSpec {
            dtype,
            ..spec.clone()
        };
        let lm = CausalLm::create(spec, method, settings, &Device::Cpu, 1, 100)?;
        prepare(&lm)?;
        Ok::<_, Error>(lm)
    };
    let mut lm = open(Precision::Bf16)?;
    let reference = open(Precision::F32)?;
    let batch = story_batch(&lm, 4)?;
    // The same adapter values in both (prepare may draw them at random).
    for ((key, var), (_, wide)) in lm.trainable().iter().zip(reference.trainable()) {
        if var.dtype() != DType::F32 {
            return Err(Error::Check(format!(
                "{name}: trainable `{key}` is {:?}, not f32",
                var.dtype()
            )));
        }
        wide.set(var.as_tensor())?;
    }
    let wide = reference.logits(&batch)?;
    let narrow = lm.logits(&batch)?;
    if narrow.dtype() != DType::BF16 {
        return Err(Error::Check(format!(
            "{name}: logits are {:?}, not bf16",
            narrow.dtype()
        )));
    }
    let scale = scalar(&wide.abs()?.flatten_all()?.max(0)?)?;
    let relative = max_abs_diff(&narrow.to_dtype(DType::F32)?, &wide)? / scale.max(1e-12);
    eprintln!("{name}: logits within {relative:.5} of f32's (relative to the largest)");
    if relative > BF16_LOGITS_TOLERANCE {
        return Err(Error::Check(format!(
            "{name}: logits differ from f32's by {relative} of the largest, over {BF16_LOGITS_TOLERANCE}"
        )));
    }

    let (losses, optimizer) = train_lm_checked(&name, &mut lm, &batch, family, (steps, lr))?;
    if let Some((key, t)) = optimizer
        .state()
        .1
        .iter()
        .find(|(_, t)| t.dtype() != DType::F32)
    {
        return Err(Error::Check(format!(
            "{name}: AdamW moment `{key}` is {:?}",
            t.dtype()
        )));
    }
    Ok(losses)
}

/// `steps` AdamW steps at `lr` on `batch`: every trainable tensor receives a gradient at the
/// last, and the loss falls as [`check_loss_fell`] asks. Returns the losses and the optimizer.
fn train_lm_checked(
    name: &str,
    lm: &mut CausalLm,
    batch: &CausalBatch,
    family: Family,
    (steps, lr): (usize, f64),
) -> Result<(Vec<f64>, AdamW)> {
    let trainable = lm.trainable();
    let (losses, silent, optimizer) = train_loop(
        lm,
        &trainable,
        |m| m.loss(batch),
        |m| m.adapter.as_mut(),
        steps,
        lr,
    )?;
    if !silent.is_empty() {
        return Err(Error::Check(format!(
            "{name}: no gradient at the last step for {silent:?}"
        )));
    }
    check_loss_fell(name, family, &losses)?;
    Ok((losses, optimizer))
}

/// The loss fell over a decoder check's steps: by 10% on Llama, 5% on the random ChatGLM, which
/// starts near ln(vocab) and moves slowly through virtual tokens (about 6% in 15 steps for
/// prompt tuning, measured).
fn check_loss_fell(name: &str, family: Family, losses: &[f64]) -> Result<()> {
    let min_drop = match family {
        Family::Llama => 0.10,
        Family::ChatGlm | Family::QuantizableLlama => 0.05,
    };
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    if last.is_nan() || last >= first * (1.0 - min_drop) {
        return Err(Error::Check(format!(
            "{name}: loss did not fall by {}%: {losses:?}",
            min_drop * 100.0
        )));
    }
    Ok(())
}

/// Gradient checkpointing gives the loss and every trainable tensor's gradient of an ordinary
/// backward (in f64, to 1e-9 of the largest gradient: only the order of additions differs).
fn check_checkpointing(name: &str, lm: &CausalLm, batch: &CausalBatch) -> Result<()> {
    let (loss, plain) = lm.loss_and_grads(batch, false, 1.0)?;
    let (recomputed_loss, recomputed) = lm.loss_and_grads(batch, true, 1.0)?;
    if scalar(&loss)? != scalar(&recomputed_loss)? {
        return Err(Error::Check(format!(
            "{name}: checkpointing changes the loss: {} against {}",
            scalar(&recomputed_loss)?,
            scalar(&loss)?
        )));
    }
    for (key, var) in lm.trainable() {
        let (Some(a), Some(b)) = (plain.get(var.as_tensor()), recomputed.get(var.as_tensor()))
        else {
            return Err(Error::Check(format!(
                "{name}: `{key}` has a gradient with one backward and not the other"
            )));
        };
        let largest = scalar(&a.abs()?.flatten_all()?.max(0)?)?;
        let diff = max_abs_diff(a, b)?;
        if diff > 1e-9 * largest.max(1e-12) {
            return Err(Error::Check(format!(
                "{name}: with checkpointing the gradient of `{key}` differs by {diff} (largest {largest})"
            )));
        }
    }
    Ok(())
}

/// Training on a quantized frozen base. A method that trains the base itself (full
/// fine-tuning) must be refused with an error that says so. Any other: its gradients agree
/// with central differences (f64) on stories260K with a q8_0 base, gradient checkpointing
/// gives the same gradients there, and on a q4_k base ([`Family::QuantizableLlama`], every
/// projection in q4_k blocks) `steps` AdamW steps at `lr` lower the loss by 5% with a
/// gradient for every trainable tensor, and the saved adapter reopens on the q4_k base, as its
/// task file says, to bit-identical logits. Returns the q4_k losses (empty when refused).
pub fn check_lm_quantized(
    method: &dyn Method,
    settings: &serde_json::Value,
    reopen_with: Box<dyn Method>,
    (steps, lr): (usize, f64),
    prepare: impl Fn(&CausalLm) -> Result<()>,
) -> Result<Vec<f64>> {
    use graft_model::quant::Quantization;
    let scratch =
        tempfile::tempdir().map_err(|e| Error::Check(format!("temporary folder: {e}")))?;
    let spec = LmSpec {
        quantize: Some(Quantization::Q8_0),
        ..lm_spec(method.name(), Family::Llama, scratch.path())?
    };
    let name = format!("{} on a q8_0 Llama", method.name());
    if method.saves_full_model() {
        return match CausalLm::create(spec, method, settings, &Device::Cpu, 1, 100) {
            Err(e) if e.to_string().contains("quantized") => Ok(Vec::new()),
            Err(e) => Err(Error::Check(format!(
                "{name}: refused, but without saying the base is quantized: {e}"
            ))),
            Ok(_) => Err(Error::Check(format!(
                "{name}: a method that trains the base accepted a quantized one"
            ))),
        };
    }
    let lm64 = CausalLm::create(
        LmSpec {
            dtype: Precision::F64,
            ..spec
        },
        method,
        settings,
        &Device::Cpu,
        7,
        100,
    )?;
    if lm64.model.quantized().is_empty() {
        return Err(Error::Check(format!("{name}: no weight is quantized")));
    }
    prepare(&lm64)?;
    let keys: Vec<(String, Var)> = lm64.trainable();
    let batch = story_batch(&lm64, 2)?;
    let per_tensor = 2;
    let samples = finite_differences(&keys, &|| lm64.loss(&batch), |_| true, per_tensor, 1e-5, 11)?;
    judge_gradients(&name, &samples, keys.len() * per_tensor)?;
    check_checkpointing(&name, &lm64, &batch)?;

    let name = format!("{} on a q4_k Llama", method.name());
    let spec = LmSpec {
        quantize: Some(Quantization::Q4K),
        ..lm_spec(method.name(), Family::QuantizableLlama, scratch.path())?
    };
    let mut lm = CausalLm::create(spec, method, settings, &Device::Cpu, 1, 100)?;
    let formats: Vec<String> = lm
        .model
        .quantized()
        .iter()
        .map(|(_, b)| graft_model::quant::format_name(b.format()))
        .collect();
    if formats.len() != lm.model.sites().len() || formats.iter().any(|f| f != "q4_k") {
        return Err(Error::Check(format!(
            "{name}: {} sites, quantized as {formats:?}",
            lm.model.sites().len()
        )));
    }
    let batch = story_batch(&lm, 4)?;
    let family = Family::QuantizableLlama;
    let (losses, _) = train_lm_checked(&name, &mut lm, &batch, family, (steps, lr))?;
    let logits = lm.logits(&batch)?;
    let dir = scratch.path().join("adapter");
    lm.save(&dir)?;
    let reopened = CausalLm::open(&dir, &registry_of(reopen_with)?, &Device::Cpu)?;
    if reopened.model.quantized().len() != formats.len() {
        return Err(Error::Check(format!(
            "{name}: the reopened base is not quantized as the trained one"
        )));
    }
    let diff = max_abs_diff(&logits, &reopened.logits(&batch)?)?;
    if diff != 0.0 {
        return Err(Error::Check(format!(
            "{name}: reopened logits differ by {diff}"
        )));
    }
    Ok(losses)
}

/// [`check_lm_method`] and [`check_lm_half_precision`] on every decoder family, and
/// [`check_lm_quantized`], the method made by `make`, reopened by another of its instances;
/// prints the losses.
pub fn check_lm_families(
    make: fn() -> Box<dyn Method>,
    settings: &serde_json::Value,
    schedule: (usize, f64),
    prepare: impl Fn(&CausalLm) -> Result<()>,
) -> Result<()> {
    for family in [Family::Llama, Family::ChatGlm] {
        let losses = check_lm_method(
            make().as_ref(),
            settings,
            make(),
            family,
            schedule,
            &prepare,
        )?;
        eprintln!("{family:?}: {losses:?}");
        let losses =
            check_lm_half_precision(make().as_ref(), settings, family, schedule, &prepare)?;
        eprintln!("{family:?} in bf16: {losses:?}");
    }
    let losses = check_lm_quantized(make().as_ref(), settings, make(), schedule, &prepare)?;
    eprintln!("on a q4_k base: {losses:?}");
    Ok(())
}

/// Sequence classification on a decoder (stories260K, read at the last real token through
/// `score`): `steps` AdamW steps at `lr` on 8 real rows lower the loss by 10% with a gradient
/// for every trainable tensor, and the saved adapter (head under
/// `base_model.model.score.weight`, no bias) reopens through `reopen_with` to identical
/// logits. Returns the losses.
pub fn check_decoder_classifier(
    method: &dyn Method,
    settings: &serde_json::Value,
    (steps, lr): (usize, f64),
    reopen_with: Box<dyn Method>,
) -> Result<Vec<f64>> {
    let spec = TaskSpec {
        model_dir: stories260k_dir(),
        ..spec(method.name(), 64)?
    };
    let name = format!("{} classifying on a decoder", method.name());
    let mut classifier =
        Classifier::create(spec, method, settings, &Device::Cpu, DType::F32, 1, 100)?;
    let (texts, labels) = real_batch(8)?;
    let (losses, silent) = train_steps(&mut classifier, &texts, &labels, steps, lr)?;
    if !silent.is_empty() {
        return Err(Error::Check(format!(
            "{name}: no gradient at the last step for {silent:?}"
        )));
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    if last >= first * 0.9 {
        return Err(Error::Check(format!(
            "{name}: loss did not fall by 10%: {losses:?}"
        )));
    }
    let logits = classifier.logits(&texts)?;
    let dir = tempfile::tempdir().map_err(|e| Error::Check(format!("temporary folder: {e}")))?;
    classifier.save(dir.path())?;
    if !classifier.full_model {
        let saved = graft_peft::adapter::SavedAdapter::read(dir.path(), &Device::Cpu)?;
        let head = saved.head("score");
        if !head.contains_key("weight") || head.contains_key("bias") {
            return Err(Error::Check(format!(
                "{name}: the saved head is {:?}, expected score.weight alone",
                head.keys().collect::<Vec<_>>()
            )));
        }
    }
    let reopened = Classifier::open(dir.path(), &registry_of(reopen_with)?, &Device::Cpu)?;
    let diff = max_abs_diff(&logits, &reopened.logits(&texts)?)?;
    if diff != 0.0 {
        return Err(Error::Check(format!(
            "{name}: reopened logits differ by {diff}"
        )));
    }
    Ok(losses)
}
