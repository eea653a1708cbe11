//! The one training loop, which every task runs (sequence classification in [`crate::train`],
//! causal-LM fine-tuning in [`crate::lm_train`]) through the small [`Task`] interface: the
//! seeded data order, gradient accumulation, f16 loss scaling, the non-finite policy, clipping,
//! the schedule, AdamW, the method's after-step hook, evaluation every `eval_every` steps (and at
//! each epoch's end and the last step) keeping the best adapter, a progress line with tokens/s
//! and an ETA, and checkpoints from which a killed run resumes to the same bytes.
use crate::checkpoint::{self, Checkpoint};
use crate::config::{OnNonFinite, TrainSection};
use crate::optim::{self, AdamW, LossScaler, ParamGroup};
use crate::run::RunDir;
use crate::{plot, Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use graft_peft::Adapter;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::time::Instant;

/// A micro-batch's part in its optimizer step: its mean loss is multiplied by `numerator` and
/// divided by `denominator` (classification: 1 over the accumulation steps; causal LM: its
/// labelled tokens over the step's, so accumulation gives the gradients of the whole batch), and
/// the gradients are those of that times `loss_scale` (f16's loss scaling; 1 otherwise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    pub numerator: f64,
    pub denominator: f64,
    pub loss_scale: f64,
}

impl Share {
    /// `loss` weighted by the share, without the loss scale (what the step reports).
    pub fn weigh(&self, loss: &Tensor) -> Result<Tensor> {
        let mut weighted = loss.clone();
        if self.numerator != 1.0 {
            weighted = (weighted * self.numerator)?;
        }
        if self.denominator != 1.0 {
            weighted = (weighted / self.denominator)?;
        }
        Ok(weighted)
    }

    /// The factor on the mean loss whose gradients are taken: weight and loss scale together.
    pub fn factor(&self) -> f64 {
        self.loss_scale * self.numerator / self.denominator
    }
}

/// How the micro-batches of a step share it (see [`Share`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulation {
    /// Each micro-batch's mean counts 1 / accumulation steps.
    MeanOfMicroBatches,
    /// Each micro-batch counts by its [`Task::units`] over the step's.
    ByUnits,
}

/// An evaluation on the held-out examples.
#[derive(Debug, Clone)]
pub struct Scored {
    /// What is logged and reported (eval.json holds the best's).
    pub metrics: Value,
    /// Higher is better: the best adapter is the highest-scoring one.
    pub score: f64,
    /// One line for the progress output.
    pub summary: String,
    /// What curves.svg plots of it: its name and value (`validation F1`, `held-out loss`).
    pub curve: (&'static str, f64),
}

/// The newest checkpoint of the run in `dir`, on graft's default device, to resume from.
pub fn latest_checkpoint(dir: &std::path::Path) -> Result<Checkpoint<LoopState>> {
    let device = graft_model::default_device()?;
    checkpoint::read_latest::<LoopState>(dir, &device)?.ok_or_else(|| {
        Error::Config(format!(
            "{} has no checkpoint to resume from (train.checkpoint_every was 0, or the run \
             stopped before its first)",
            dir.display()
        ))
    })
}

/// What the loop needs of a task.
pub trait Task {
    /// A micro-batch, tokenized.
    type Batch;
    /// The training examples the data order runs over.
    fn examples(&self) -> usize;
    /// Examples `rows`, tokenized.
    fn batch(&self, rows: &[usize]) -> Result<Self::Batch>;
    /// Tokens the model computes for `batch`, padding included.
    fn tokens(&self, batch: &Self::Batch) -> usize;
    /// What the task's loss averages over in `batch` (rows, or labelled tokens).
    fn units(&self, batch: &Self::Batch) -> usize;
    fn accumulation(&self) -> Accumulation;
    /// The weighted loss of `batch` (its mean plus the method's extra term, weighed by `share`,
    /// unscaled) and the gradients of the trainable tensors.
    fn loss_and_grads(&self, batch: &Self::Batch, share: Share) -> Result<(f64, GradStore)>;
    /// Every trainable tensor under the key checkpoints store it by.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// The optimizer's parameter groups (the same tensors as [`Task::trainable`]).
    fn param_groups(&self, train: &TrainSection) -> Vec<ParamGroup>;
    fn adapter(&self) -> &dyn Adapter;
    fn adapter_mut(&mut self) -> &mut dyn Adapter;
    /// Whether the loss is scaled for the backward (f16).
    fn scales_loss(&self) -> bool {
        false
    }
    /// An evaluation on the held-out examples, or `None` when there are none.
    fn evaluate(&mut self) -> Result<Option<Scored>>;
    /// Writes the adapter as it is now: the best so far (or, without evaluations, the last).
    fn save(&self, run: &RunDir) -> Result<()>;
    /// Task-specific fields of eval.json and train.json (speeds, sizes, batches by data row).
    fn report(&self, _state: &LoopState, _report: &mut Value) {}
    /// What the task trains and evaluates on, which a checkpoint records so that a resumed run
    /// refuses data that changed since (its saved order would pick other rows, or none).
    fn data_identity(&self) -> Result<DataIdentity>;
}

/// The identity of a run's data: the config's data fields, how many examples were read, and a
/// hash of their content as read (after templates, clipping and the split), so that an edit of
/// the file, of a column the template reads, or of the split is noticed on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataIdentity {
    /// The config's data fields by their dotted names (`data.train`), see [`DataIdentity::fields`].
    pub fields: Value,
    pub train_examples: usize,
    pub held_out_examples: usize,
    /// SHA-256, hex, of every example's parts in order (see [`DataHasher`]).
    pub content_sha256: String,
}

impl DataIdentity {
    /// The fields of config `section` (a serialised table) under dotted names, for
    /// [`DataIdentity::fields`].
    pub fn fields(section: &str, table: &impl Serialize, into: &mut Value) -> Result<()> {
        let table = serde_json::to_value(table).map_err(|e| Error::Config(e.to_string()))?;
        if let (Value::Object(fields), Some(into)) = (table, into.as_object_mut()) {
            for (key, value) in fields {
                into.insert(format!("{section}.{key}"), value);
            }
        }
        Ok(())
    }

    /// Why a run recorded as `self` cannot resume on `now`: each difference in words, or `None`
    /// when they agree.
    pub fn differences(&self, now: &DataIdentity) -> Option<String> {
        let mut changed = Vec::new();
        let fields = |v: &Value| v.as_object().cloned().unwrap_or_default();
        let (then_fields, now_fields) = (fields(&self.fields), fields(&now.fields));
        let mut keys: Vec<&String> = then_fields.keys().chain(now_fields.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let (was, is) = (then_fields.get(key), now_fields.get(key));
            if was != is {
                let show = |v: Option<&Value>| v.map_or("(unset)".to_string(), Value::to_string);
                changed.push(format!("{key} was {} and is {}", show(was), show(is)));
            }
        }
        if self.train_examples != now.train_examples {
            changed.push(format!(
                "{} training examples were read then and {} now",
                self.train_examples, now.train_examples
            ));
        }
        if self.held_out_examples != now.held_out_examples {
            changed.push(format!(
                "{} held-out examples were read then and {} now",
                self.held_out_examples, now.held_out_examples
            ));
        }
        if changed.is_empty() && self.content_sha256 != now.content_sha256 {
            changed.push(format!(
                "the same number of examples, with other content (SHA-256 {} then, {} now)",
                short_hash(&self.content_sha256),
                short_hash(&now.content_sha256)
            ));
        }
        (!changed.is_empty()).then(|| changed.join("; "))
    }
}

fn short_hash(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

/// Hashes examples part by part, each length-prefixed so that no two sequences of parts hash
/// alike by moving text across a boundary.
#[derive(Default)]
pub struct DataHasher(sha2::Sha256);

impl DataHasher {
    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        use sha2::Digest;
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub fn number(&mut self, n: usize) -> &mut Self {
        self.part(&(n as u64).to_le_bytes())
    }

    pub fn finish(self) -> String {
        use sha2::Digest;
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The best evaluation so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Best {
    pub step: usize,
    pub score: f64,
    pub metrics: Value,
    pub summary: String,
}

/// Where the loop stands after a step: with the tensors, optimizer and adapter state of a
/// checkpoint, everything a resumed run needs to continue exactly as an uninterrupted one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps done.
    pub done: usize,
    pub epoch: usize,
    /// Shuffled order of the training examples for this epoch, and how far it has been read.
    pub order: Vec<usize>,
    pub cursor: usize,
    /// The shuffling generator's word position (a u128, as text: JSON numbers are f64).
    pub rng_position: String,
    pub best: Option<Best>,
    /// Every evaluation: `{ "step": .., "metrics": .. }`.
    pub evaluations: Vec<Value>,
    /// `(step, loss)` of every step taken, and `(step, value)` of every evaluation's plotted
    /// figure, named `eval_curve_name`.
    pub loss_curve: Vec<(f64, f64)>,
    pub eval_curve: Vec<(f64, f64)>,
    pub eval_curve_name: String,
    /// Each step's examples (positions in the training examples).
    pub batches: Vec<Vec<usize>>,
    pub tokens: usize,
    /// Seconds of each step's forward, backward and update, tokenization excluded.
    pub step_seconds: Vec<f64>,
    /// Seconds spent tokenizing each step's batches.
    pub tokenize_seconds: Vec<f64>,
    /// Steps whose batch gave a NaN or infinite loss or gradient and was skipped.
    pub skipped: Vec<usize>,
    /// f16's loss scaler, where the task scales its loss.
    pub scaler: Option<LossScaler>,
    /// The data the run trains on; absent in checkpoints of graft before it was recorded.
    #[serde(default)]
    pub data: Option<DataIdentity>,
}

impl LoopState {
    /// The losses of the steps taken, in order.
    pub fn losses(&self) -> Vec<f64> {
        self.loss_curve.iter().map(|(_, l)| *l).collect()
    }
}

/// Reports training progress: a bar on a terminal, a line per logged step otherwise.
pub struct Progress {
    bar: indicatif::ProgressBar,
    plain: bool,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        let plain = !std::io::stderr().is_terminal();
        let bar = if plain {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  elapsed {elapsed_precise}  ETA {eta_precise}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        };
        Self { bar, plain }
    }

    fn step(&self, step: usize, total: usize, message: &str, log: bool) {
        self.bar.set_position(step as u64);
        self.bar.set_message(message.to_string());
        if self.plain && log {
            eprintln!("step {step}/{total}  {message}");
        }
    }

    pub fn note(&self, message: &str) {
        self.bar.suspend(|| eprintln!("{message}"));
    }
}

/// `seconds` as `1h02m03s`, `2m03s` or `3s`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// Trains `task` for `total` optimizer steps with `train`'s settings, logging into `run` and
/// checkpointing there; a `resume_from` checkpoint continues its run. `intro` is the first
/// line shown. Writes eval.json (the best evaluation and the run's speed) and train.json (every
/// step's loss and batch) at the end, and returns the loop's final state.
pub fn fit<T: Task>(
    task: &mut T,
    train: &TrainSection,
    total: usize,
    run: &mut RunDir,
    resume_from: Option<Checkpoint<LoopState>>,
    intro: &str,
) -> Result<LoopState> {
    if task.examples() == 0 {
        return Err(Error::Config("no training examples".into()));
    }
    let trainable = task.trainable();
    let vars: Vec<Var> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(
        task.param_groups(train),
        train.beta1,
        train.beta2,
        train.eps,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(train.seed);
    let data = task.data_identity()?;
    let mut state = LoopState {
        scaler: task.scales_loss().then(LossScaler::default),
        data: Some(data.clone()),
        ..LoopState::default()
    };
    if let Some(checkpoint) = resume_from {
        check_resumable(&checkpoint, &data, task.examples())?;
        restore(task, &trainable, &mut optimizer, &mut rng, &checkpoint)?;
        state = checkpoint.state;
    }
    let accum = train.grad_accum.max(1);
    let warmup = (train.warmup_ratio * total as f64).round() as usize;
    let progress = Progress::new(total);
    let resuming = if state.done > 0 {
        format!(", resuming after step {}", state.done)
    } else {
        String::new()
    };
    progress.note(&format!("{intro}{resuming}"));
    let started = Instant::now();
    // The ETA counts this process's steps only (a resumed run's are fewer).
    let first_step = state.done;
    task.adapter_mut().set_training(true);

    for step in state.done..total {
        let step_started = Instant::now();
        let mut batches = Vec::with_capacity(accum);
        let mut rows_of_step = Vec::new();
        for _ in 0..accum {
            if state.cursor >= state.order.len() {
                state.order = (0..task.examples()).collect();
                state.order.shuffle(&mut rng);
                state.cursor = 0;
                state.epoch += 1;
            }
            let take = (state.order.len() - state.cursor).min(train.batch_size);
            let rows = state.order[state.cursor..state.cursor + take].to_vec();
            state.cursor += take;
            let batch = task.batch(&rows)?;
            // Tokens as computed, padding included (batches pad to their longest row).
            state.tokens += task.tokens(&batch);
            rows_of_step.extend(rows);
            batches.push(batch);
        }
        let tokenizing = step_started.elapsed();
        let loss_scale = state.scaler.as_ref().map_or(1.0, LossScaler::scale);
        let (step_loss, mut grads) = step_gradients(task, &batches, loss_scale, &vars)?;
        let done = step + 1;
        state.batches.push(rows_of_step);
        // An f16 step whose scaled gradients overflowed updates nothing (the scale halves).
        let overflowed = match state.scaler.as_mut() {
            Some(scaler) if step_loss.is_finite() => !scaler.unscale(&mut grads, &vars)?,
            _ => false,
        };
        let norm = optim::global_norm(&grads, &vars)?;
        let diverged = |run: &RunDir| Error::NonFinite {
            step: done,
            loss: step_loss,
            grad_norm: norm,
            kept: run.root.clone(),
        };
        if overflowed {
            progress.note(&format!(
                "step {done}: the f16 gradients overflowed; skipped, loss scale now {}",
                state.scaler.as_ref().map_or(1.0, LossScaler::scale)
            ));
            state.skipped.push(done);
            run.log(
                &json!({ "step": done, "skipped": true, "overflow": true, "loss": step_loss }),
            )?;
        } else if !(step_loss.is_finite() && norm.is_finite()) {
            if train.on_non_finite == OnNonFinite::Stop {
                return Err(diverged(run));
            }
            progress.note(&format!(
                "step {done}: loss {step_loss}, gradient norm {norm}: batch skipped"
            ));
            state.skipped.push(done);
            run.log(&json!({ "step": done, "skipped": true, "loss": step_loss.to_string(), "grad_norm": norm.to_string() }))?;
        } else {
            if train.max_grad_norm > 0.0 && norm > train.max_grad_norm {
                optim::scale_grads(&mut grads, &vars, train.max_grad_norm / norm)?;
            }
            let factor = optim::lr_factor(train.schedule, step, total, warmup);
            optimizer.step(&grads, factor)?;
            // An update can overflow even from finite gradients; it cannot be undone, so the
            // run stops before such parameters reach a checkpoint, whatever the policy.
            if !optim::all_finite(&vars)? {
                return Err(diverged(run));
            }
            task.adapter_mut().after_step(done, &grads)?;
            state
                .step_seconds
                .push((step_started.elapsed() - tokenizing).as_secs_f64());
            state.tokenize_seconds.push(tokenizing.as_secs_f64());
            state.loss_curve.push((done as f64, step_loss));
            let computing = state.step_seconds.iter().sum::<f64>().max(1e-9);
            let tokens_per_s = state.tokens as f64 / computing;
            let per_step = started.elapsed().as_secs_f64() / (done - first_step) as f64;
            let eta = duration(per_step * (total - done) as f64);
            let log_now = done % train.log_every.max(1) == 0 || done == total || done == 1;
            progress.step(
                done,
                total,
                &format!(
                    "loss {step_loss:.4}  {tokens_per_s:.0} tok/s  epoch {}  ETA {eta}",
                    state.epoch
                ),
                log_now,
            );
            if log_now {
                run.log(&json!({
                    "step": done, "epoch": state.epoch, "loss": step_loss,
                    "lr": train.lr * factor, "grad_norm": norm, "tokens_per_s": tokens_per_s,
                    "elapsed_s": started.elapsed().as_secs_f64(),
                    // The process's peak resident memory so far, in GiB.
                    "peak_gb": peak_rss_mb().map(|mb| mb / 1024.0),
                }))?;
            }
        }

        let epoch_end = state.cursor >= state.order.len();
        let periodic = train.eval_every > 0 && done % train.eval_every == 0;
        if epoch_end || periodic || done == total {
            evaluate(task, &mut state, run, &progress, done)?;
        }
        if train.checkpoint_every > 0 && (done % train.checkpoint_every == 0 || done == total) {
            state.done = done;
            state.rng_position = rng.get_word_pos().to_string();
            let tensors: Vec<(String, Tensor)> = trainable
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let (_, moments) = optimizer.state();
            checkpoint::write(
                &run.root,
                checkpoint::Parts {
                    step: done,
                    trainable: &tensors,
                    optimizer: &moments,
                    adapter_state: &task.adapter().training_state()?,
                    state: &state,
                },
            )?;
        }
    }
    progress.bar.finish_and_clear();
    task.adapter_mut().set_training(false);
    state.done = total;
    if state.best.is_none() {
        // Nothing was held out: the adapter is the last step's.
        task.save(run)?;
    }
    write_reports(task, &state, run, total, train)?;
    Ok(state)
}

/// The loss of one optimizer step over its micro-batches `batches` and the summed gradients of
/// `vars`, each micro-batch weighed as [`Task::accumulation`] says: with `ByUnits`, the same
/// gradients (up to rounding) as one batch of all their examples. `loss_scale` multiplies the
/// gradients (f16), not the loss returned.
pub fn step_gradients<T: Task>(
    task: &T,
    batches: &[T::Batch],
    loss_scale: f64,
    vars: &[Var],
) -> Result<(f64, GradStore)> {
    let all_units: usize = batches.iter().map(|b| task.units(b)).sum();
    let mut grads: Option<GradStore> = None;
    let mut step_loss = 0.0;
    for batch in batches {
        let share = match task.accumulation() {
            Accumulation::MeanOfMicroBatches => Share {
                numerator: 1.0,
                denominator: batches.len() as f64,
                loss_scale,
            },
            Accumulation::ByUnits => Share {
                numerator: task.units(batch) as f64,
                denominator: all_units.max(1) as f64,
                loss_scale,
            },
        };
        let (loss, micro) = task.loss_and_grads(batch, share)?;
        step_loss += loss;
        match grads.as_mut() {
            Some(g) => optim::accumulate(g, micro, vars)?,
            None => grads = Some(micro),
        }
    }
    let grads = grads.ok_or_else(|| Error::Config("an empty step".into()))?;
    Ok((step_loss, grads))
}

/// Refuses a checkpoint whose run read other data than `now`, or that was written before runs
/// recorded their data, and checks every saved position against the `examples` there are
/// before the loop indexes by it.
fn check_resumable(
    checkpoint: &Checkpoint<LoopState>,
    now: &DataIdentity,
    examples: usize,
) -> Result<()> {
    let refuse = |reason: String| Error::Resume {
        checkpoint: checkpoint.dir.clone(),
        reason,
    };
    let state = &checkpoint.state;
    let saved = state.data.as_ref().ok_or_else(|| {
        refuse("it does not record the data its run trained on (a graft older than that record wrote it), so a resume could not tell whether the data changed; train afresh instead (the same command without --resume, with a new --out)".into())
    })?;
    if let Some(changed) = saved.differences(now) {
        return Err(refuse(format!(
            "the training data changed since it was written: {changed}. Its saved data order would pick other rows; restore the data as it was, or train afresh on the data as it is now (the same command without --resume, with a new --out)"
        )));
    }
    // The data agree, so these hold unless the checkpoint itself was edited or damaged.
    let out_of_range = |what: &str| {
        refuse(format!(
            "its {what} names an example past the {examples} there are (a damaged state.json)"
        ))
    };
    if state.order.iter().any(|&i| i >= examples) {
        return Err(out_of_range("data order"));
    }
    if state.cursor > state.order.len() {
        return Err(out_of_range("position in the data order"));
    }
    if state.batches.iter().flatten().any(|&i| i >= examples) {
        return Err(out_of_range("record of batches"));
    }
    Ok(())
}

/// Puts the checkpoint's tensors, moments, method state and data position back.
fn restore<T: Task>(
    task: &mut T,
    trainable: &[(String, Var)],
    optimizer: &mut AdamW,
    rng: &mut rand_chacha::ChaCha8Rng,
    checkpoint: &Checkpoint<LoopState>,
) -> Result<()> {
    for (key, var) in trainable {
        let saved = checkpoint
            .trainable
            .get(key)
            .ok_or_else(|| Error::Adapter {
                path: checkpoint.dir.clone(),
                reason: format!("the checkpoint lacks `{key}`"),
            })?;
        var.set(&saved.to_dtype(var.dtype())?)?;
    }
    let optimizer_steps = checkpoint.state.loss_curve.len();
    optimizer.restore(optimizer_steps, &checkpoint.optimizer)?;
    task.adapter_mut()
        .restore_training_state(&checkpoint.adapter_state)?;
    let position: u128 = checkpoint.state.rng_position.parse().map_err(|_| {
        Error::Config(format!(
            "{}: bad RNG position `{}`",
            checkpoint.dir.display(),
            checkpoint.state.rng_position
        ))
    })?;
    rng.set_word_pos(position);
    Ok(())
}

/// Evaluates after step `done`, logs it, keeps the adapter when it is the best so far, and
/// redraws the curves.
fn evaluate<T: Task>(
    task: &mut T,
    state: &mut LoopState,
    run: &mut RunDir,
    progress: &Progress,
    done: usize,
) -> Result<()> {
    task.adapter_mut().set_training(false);
    let scored = task.evaluate();
    task.adapter_mut().set_training(true);
    let Some(scored) = scored? else {
        return Ok(());
    };
    state
        .evaluations
        .push(json!({ "step": done, "metrics": scored.metrics }));
    run.log(&json!({ "step": done, "epoch": state.epoch, "eval": scored.metrics }))?;
    progress.note(&format!("step {done}: {}", scored.summary));
    // A NaN score (a diverged model's loss) is neither plotted nor ever the best.
    if !scored.score.is_finite() {
        return Ok(());
    }
    state.eval_curve.push((done as f64, scored.curve.1));
    state.eval_curve_name = scored.curve.0.to_string();
    if state.best.as_ref().is_none_or(|b| scored.score > b.score) {
        task.save(run)?;
        state.best = Some(Best {
            step: done,
            score: scored.score,
            metrics: scored.metrics,
            summary: scored.summary,
        });
    }
    run.write(
        RunDir::CURVES,
        &plot::curves_svg(&state.loss_curve, &state.eval_curve_name, &state.eval_curve),
    )
}

/// eval.json: the best evaluation's metrics with its step, every evaluation, the skipped steps
/// and the run's speed and memory (and the task's own fields); train.json: every step's loss
/// and batch, and the same speed figures.
fn write_reports<T: Task>(
    task: &T,
    state: &LoopState,
    run: &RunDir,
    total: usize,
    train: &TrainSection,
) -> Result<()> {
    let median = median_after_warmup(&state.step_seconds);
    let steps_done = state.step_seconds.len().max(1) as f64;
    let speed = json!({
        "steps": total,
        "skipped_steps": state.skipped,
        "train_seconds": state.step_seconds.iter().sum::<f64>(),
        "step_seconds_median": median,
        "tokenize_seconds_median": median_after_warmup(&state.tokenize_seconds),
        // Steady state: the mean tokens of a step over the median step after warm-up (the
        // running rate in the log includes the slow first steps).
        "train_tokens_per_s": state.tokens as f64 / steps_done / median.max(1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_training_mb": peak_rss_in_window_mb(),
        "matmul": graft_model::ops::matmul_path(),
        "batch_size": train.batch_size,
        "grad_accum": train.grad_accum,
    });
    let mut report = match &state.best {
        Some(best) => {
            let mut metrics = best.metrics.clone();
            metrics["step"] = json!(best.step);
            metrics
        }
        None => json!({}),
    };
    report["best_step"] = json!(state.best.as_ref().map(|b| b.step));
    report["evaluations"] = json!(state.evaluations);
    let mut report = graft_peft::config::merge_json(report, speed.clone());
    task.report(state, &mut report);
    run.write(RunDir::EVAL, &to_pretty(&report)?)?;

    let summary = json!({
        "losses": state.losses(),
        "loss_steps": state.loss_curve.iter().map(|(s, _)| *s as usize).collect::<Vec<_>>(),
        "batches": state.batches,
        "tokens": state.tokens,
    });
    let mut summary = graft_peft::config::merge_json(summary, speed);
    task.report(state, &mut summary);
    run.write(RunDir::TRAIN, &to_pretty(&summary)?)
}

/// The values of the tensors `named` (trainable parameters, a head).
pub fn value_count(named: &[(String, Var)]) -> usize {
    named.iter().map(|(_, v)| v.elem_count()).sum()
}

fn to_pretty(value: &Value) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|e| Error::Config(e.to_string()))
}

/// Median step time, the first two steps (allocation warm-up) left out when there are more.
pub fn median_after_warmup(step_seconds: &[f64]) -> f64 {
    let skip = if step_seconds.len() > 4 { 2 } else { 0 };
    median(&step_seconds[skip..]).unwrap_or(0.0)
}

/// The median (the mean of the middle two for an even count), if there are values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The peak before [`start_peak_rss_window`] last reset it, in KiB (0: never reset).
static PEAK_BEFORE_WINDOW_KIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// This process's peak resident memory in MiB (Linux's VmHWM), if the system reports it: over
/// the whole process, windows included.
pub fn peak_rss_mb() -> Option<f64> {
    let before = PEAK_BEFORE_WINDOW_KIB.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    status_mb("VmHWM:").map(|now| now.max(before))
}

/// Starts measuring the peak anew from now (Linux resets VmHWM when 5 is written to
/// /proc/self/clear_refs), keeping the whole process's peak for [`peak_rss_mb`]; returns the
/// peak so far. What [`peak_rss_in_window_mb`] then reports is the peak of what comes after,
/// e.g. the training steps apart from building the model.
pub fn start_peak_rss_window() -> Option<f64> {
    let so_far = peak_rss_mb()?;
    PEAK_BEFORE_WINDOW_KIB.store(
        (so_far * 1024.0) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    Some(so_far)
}

/// The peak resident memory in MiB since [`start_peak_rss_window`] (the whole process's if it
/// was never called or the system cannot reset it).
pub fn peak_rss_in_window_mb() -> Option<f64> {
    status_mb("VmHWM:")
}

/// This process's resident memory now, in MiB (Linux's VmRSS).
pub fn rss_mb() -> Option<f64> {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_skips_warm_up_steps() {
        assert_eq!(median_after_warmup(&[9.0, 9.0, 1.0, 2.0, 3.0]), 2.0);
        assert_eq!(median_after_warmup(&[1.0, 3.0]), 2.0);
        assert_eq!(median_after_warmup(&[]), 0.0);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb().unwrap() > 1.0);
            assert!(rss_mb().unwrap() > 1.0 && rss_mb() <= peak_rss_mb());
        }
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(duration(3.4), "3s");
        assert_eq!(duration(123.0), "2m03s");
        assert_eq!(duration(3723.0), "1h02m03s");
    }
}
