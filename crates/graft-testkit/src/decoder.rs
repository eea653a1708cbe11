//! The checks on decoders: causal-LM training on every family, half precision, a quantized
//! base, and sequence classification through a decoder.
use crate::fixtures::{
    lm_spec, max_abs_diff, real_batch, registry_of, scalar, spec, stories260k_dir, story_batch,
    Family,
};
use crate::gradients::{finite_differences, judge_gradients};
use crate::training::{judge_training, train_loop, train_steps};
use crate::{Error, Result};
use candle_core::{DType, Device, Var};
use graft_peft::Method;
use graft_tokenizer::CausalBatch;
use graft_trainer::config::Precision;
use graft_trainer::lm::{CausalLm, LmSpec};
use graft_trainer::optim::AdamW;
use graft_trainer::task::{Classifier, TaskSpec};

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
    let scratch = crate::fixtures::scratch_dir()?;
    let spec = lm_spec(method.name(), family, scratch.path())?;
    let name = format!("{} on {family:?}", method.name());

    let mut lm64 = lm_f64(method, settings, spec.clone(), &prepare)?;
    let keys: Vec<(String, Var)> = lm64.trainable();
    if keys.is_empty() {
        return Err(Error::Check(format!("{name} trains no tensor")));
    }
    let batch = story_batch(&lm64, 2)?;
    let per_tensor = 2;
    let samples = finite_differences(
        &keys,
        &|| Ok(lm64.loss(&batch)?),
        |_| true,
        per_tensor,
        1e-5,
        11,
    )?;
    judge_gradients(&name, &samples, keys.len() * per_tensor)?;
    check_checkpointing(&name, &mut lm64, &batch)?;

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
    let scratch = crate::fixtures::scratch_dir()?;
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
        |m| Ok(m.loss(batch)?),
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

/// [`check_checkpointing`] alone, for `method` on `family` in f64 (`prepare` as
/// [`check_lm_method`] takes it): for a test binary that sets `GRAFT_REFERENCE_OPS=1`, where
/// the dropout masks are made as on a GPU.
pub fn check_lm_checkpointing(
    method: &dyn Method,
    settings: &serde_json::Value,
    family: Family,
    prepare: impl Fn(&CausalLm) -> Result<()>,
) -> Result<()> {
    let scratch = crate::fixtures::scratch_dir()?;
    let spec = lm_spec(method.name(), family, scratch.path())?;
    let mut lm64 = lm_f64(method, settings, spec, &prepare)?;
    let batch = story_batch(&lm64, 2)?;
    let name = format!("{} on {family:?}", method.name());
    check_checkpointing(&name, &mut lm64, &batch)
}

/// `method` on `spec`'s model in f64 (seed 7), made ready by `prepare`: what the gradient
/// and checkpointing checks compare.
fn lm_f64(
    method: &dyn Method,
    settings: &serde_json::Value,
    spec: LmSpec,
    prepare: &impl Fn(&CausalLm) -> Result<()>,
) -> Result<CausalLm> {
    let spec = LmSpec {
        dtype: Precision::F64,
        ..spec
    };
    let lm64 = CausalLm::create(spec, method, settings, &Device::Cpu, 7, 100)?;
    prepare(&lm64)?;
    Ok(lm64)
}

/// Gradient checkpointing gives the loss and every trainable tensor's gradient of an ordinary
/// backward (in f64, to 1e-9 of the largest gradient: only the order of additions differs), in
/// evaluation mode and, for a method with dropout, in training mode: from the same generator
/// position both draw the same masks (the recomputed blocks those of their forward), report
/// the loss those gradients belong to, and leave the generator at the same position.
fn check_checkpointing(name: &str, lm: &mut CausalLm, batch: &CausalBatch) -> Result<()> {
    let (eval_loss, _) = compare_checkpointing(name, lm, batch)?;
    let Some(p) = lm.adapter.dropout().map(|d| d.p()).filter(|&p| p > 0.0) else {
        return Ok(());
    };
    let name = format!("{name} with dropout {p}");
    lm.adapter.set_training(true);
    let compared = compare_checkpointing(&name, lm, batch);
    lm.adapter.set_training(false);
    let (train_loss, drew) = compared?;
    // Otherwise the masks would not be tested: the loss must see them.
    if train_loss == eval_loss || !drew {
        return Err(Error::Check(format!(
            "{name}: dropout changed nothing (loss {train_loss} in both modes)"
        )));
    }
    Ok(())
}

/// The loss and gradients of `lm` on `batch` without and with checkpointing, each from the
/// same dropout generator position, compared; returns the loss and whether masks were drawn.
fn compare_checkpointing(name: &str, lm: &CausalLm, batch: &CausalBatch) -> Result<(f64, bool)> {
    let dropout = lm.adapter.dropout();
    let position = || dropout.map(|d| d.position()).transpose();
    let start = position()?;
    let (loss, plain) = lm.loss_and_grads(batch, false, 1.0)?;
    let after_plain = position()?;
    if let (Some(d), Some(start)) = (dropout, start) {
        d.rewind(start)?;
    }
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
    if position()? != after_plain {
        return Err(Error::Check(format!(
            "{name}: checkpointing leaves the dropout generator elsewhere than a plain step"
        )));
    }
    Ok((scalar(&loss)?, start != after_plain))
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
    let scratch = crate::fixtures::scratch_dir()?;
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
    let mut lm64 = lm_f64(method, settings, spec, &prepare)?;
    if lm64.model.quantized().is_empty() {
        return Err(Error::Check(format!("{name}: no weight is quantized")));
    }
    let keys: Vec<(String, Var)> = lm64.trainable();
    let batch = story_batch(&lm64, 2)?;
    let per_tensor = 2;
    let samples = finite_differences(
        &keys,
        &|| Ok(lm64.loss(&batch)?),
        |_| true,
        per_tensor,
        1e-5,
        11,
    )?;
    judge_gradients(&name, &samples, keys.len() * per_tensor)?;
    check_checkpointing(&name, &mut lm64, &batch)?;

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
    judge_training(&name, &losses, &silent)?;
    let logits = classifier.logits(&texts)?;
    let dir = crate::fixtures::scratch_dir()?;
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

/// Gradient accumulation is exact: one optimizer step's gradients for a batch of four pairs
/// equal those of two accumulated micro-batches of two on the same pairs, as the training loop
/// computes them (`fit::step_gradients`), in f64, to 1e-12 of each tensor's largest gradient,
/// with and without gradient checkpointing; the step's loss too. The two micro-batches hold
/// different numbers of labelled tokens, so a mean of their means would fail. `settings` should
/// turn dropout off (masks of other shapes are other draws).
pub fn check_accumulation(
    method: &dyn Method,
    settings: &serde_json::Value,
    family: Family,
    prepare: impl Fn(&CausalLm) -> Result<()>,
) -> Result<()> {
    use graft_trainer::fit::{step_gradients, Task};
    use graft_trainer::lm_train::{LmData, LmTask};
    let scratch = crate::fixtures::scratch_dir()?;
    let spec = LmSpec {
        dtype: Precision::F64,
        ..lm_spec(method.name(), family, scratch.path())?
    };
    for checkpointing in [false, true] {
        let name = format!(
            "{} on {family:?}, checkpointing {checkpointing}",
            method.name()
        );
        let mut config = crate::fixtures::lm_config(
            &spec,
            settings,
            &crate::fixtures::story_pairs(4),
            graft_trainer::config::TrainSection::default(),
            scratch.path(),
        )?;
        config.model.checkpointing = checkpointing;
        let lm = CausalLm::create(spec.clone(), method, settings, &Device::Cpu, 7, 1)?;
        prepare(&lm)?;
        let task = LmTask::new(lm, LmData::load(&config)?, config);
        let vars: Vec<Var> = task.trainable().into_iter().map(|(_, v)| v).collect();
        let halves = [task.batch(&[0, 1])?, task.batch(&[2, 3])?];
        if task.units(&halves[0]) == task.units(&halves[1]) {
            return Err(Error::Check(format!(
                "{name}: the micro-batches hold the same number of labelled tokens: the check proves less"
            )));
        }
        let (whole_loss, whole) = step_gradients(&task, &[task.batch(&[0, 1, 2, 3])?], 1.0, &vars)?;
        let (split_loss, split) = step_gradients(&task, &halves, 1.0, &vars)?;
        if (whole_loss - split_loss).abs() > 1e-12 * whole_loss.abs() {
            return Err(Error::Check(format!(
                "{name}: the accumulated loss {split_loss} is not the batch's {whole_loss}"
            )));
        }
        for (key, var) in task.trainable() {
            let (Some(a), Some(b)) = (whole.get(var.as_tensor()), split.get(var.as_tensor()))
            else {
                return Err(Error::Check(format!(
                    "{name}: `{key}` has a gradient one way and not the other"
                )));
            };
            let largest = scalar(&a.abs()?.flatten_all()?.max(0)?)?;
            let diff = max_abs_diff(a, b)?;
            if largest == 0.0 || diff > 1e-12 * largest {
                return Err(Error::Check(format!(
                    "{name}: the accumulated gradient of `{key}` differs by {diff} (largest {largest})"
                )));
            }
        }
    }
    Ok(())
}
