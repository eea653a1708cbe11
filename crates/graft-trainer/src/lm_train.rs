//! `graft train-lm` as a library: the causal-LM run's config, its data and held-out split,
//! and the decoder task the training loop ([`crate::fit`]) drives, keeping the best adapter by
//! the verbalizer's F1 (where `[eval] labels` are set) or else by the held-out loss.
use crate::checkpoint;
use crate::error::io_error;
use crate::fit::{self, Accumulation, Scored, Share};
use crate::lm::{clip_chars, CausalLm, LmSpec, PromptSource, LM_TASK_FILE};
use crate::optim::ParamGroup;
use crate::run::RunDir;
use crate::{Error, Result};
use candle_core::Var;
use graft_model::quant::Quantization;
use graft_peft::loader::Registry;
use graft_tokenizer::{encode_causal, CausalBatch, ChatTemplate, PromptResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

/// A causal-LM training run's configuration (TOML; see `configs/lm/knowledge-adalora.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LmConfig {
    pub model: LmModelSection,
    pub data: LmDataSection,
    /// The settings of classification runs, with the same meaning: `max_steps` counts
    /// optimizer steps of `batch_size` x `grad_accum` pairs (`epochs` is unused: a run cycles
    /// through the pairs), `checkpoint_every` writes what `--resume` continues from, `eval_every`
    /// evaluates on the held-out pairs (also at each epoch's end and the last step) and the best
    /// adapter is kept, `on_non_finite` stops or skips a NaN step.
    pub train: crate::config::TrainSection,
    /// `name` picks the plugin; every other key is the method's own (PEFT's field names).
    pub method: toml::Table,
    pub eval: LmEvalSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmModelSection {
    /// A Hugging Face folder, a `.gguf` file or a hub id (`owner/name[@revision]`, fetched; a
    /// local path of that name wins); empty: `name`.
    pub path: Option<PathBuf>,
    /// A model graft knows how to fetch (`smollm2`) or a hub id, used when `path` is not set.
    pub name: String,
    /// tokenizer.json; empty: beside the model.
    pub tokenizer: Option<PathBuf>,
    /// `plain`, `chatglm2` or `chatml`.
    pub template: String,
    /// ChatML's system turn.
    pub system: Option<String>,
    pub max_len: usize,
    /// Pad every batch to `max_len` rather than to its longest row (static shapes: every step
    /// of a benchmark the same size).
    pub pad_to_max_len: bool,
    /// The base weights' and activations' dtype: `f32`, `bf16` or `f16`.
    pub dtype: crate::config::Precision,
    /// Keep the frozen projection weights quantized: `q8_0` or `q4_k` (QLoRA-style); the
    /// embeddings, norms and activations stay in `dtype`.
    pub quantize: Option<Quantization>,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping
    /// them (gradient checkpointing): memory for one layer's activations instead of all.
    pub checkpointing: bool,
    /// `path` is a config.json (`configs/shapes/`) to build the model from with random weights
    /// seeded by `train.seed` (`--random-init`): a model's real size without its weights.
    pub random_init: bool,
}

impl Default for LmModelSection {
    fn default() -> Self {
        Self {
            path: None,
            name: "smollm2".into(),
            tokenizer: None,
            template: "chatml".into(),
            system: None,
            max_len: 256,
            pad_to_max_len: false,
            dtype: crate::config::Precision::F32,
            quantize: None,
            checkpointing: false,
            random_init: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LmDataSection {
    /// JSONL of `{"prompt": ..., "response": ...}`, or a CSV whose rows `prompt` and
    /// `response` render.
    pub train: Option<PathBuf>,
    /// CSV only: the prompt, a template over the columns (`{title}. {abstract}`).
    pub prompt: Option<String>,
    /// CSV only: the response, a template over the columns (`{label}`).
    pub response: Option<String>,
    /// Rendered prompts longer than this many characters are cut (0: never), so that a long
    /// abstract cannot push the chat template's start out of `max_len` tokens.
    pub max_prompt_chars: usize,
    /// Share of the pairs held out for evaluation: of each class (by `eval.label_column`) where
    /// `[eval] labels` are set (CSV), else a seeded draw (the held-out loss is then the metric).
    pub val_fraction: f64,
    /// Rows whose 0-based index is a multiple of this are never trained on: the report rows
    /// of `graft keywords-eval` (5 there). 0: every row may be trained on.
    pub report_every: usize,
}

impl LmDataSection {
    /// The CSV prompt training renders, recorded in the adapter for later prompts.
    pub fn prompt_source(&self) -> Option<PromptSource> {
        let is_csv = self.train.as_ref()?.extension().is_some_and(|x| x == "csv");
        Some(PromptSource {
            template: self.prompt.clone().filter(|_| is_csv)?,
            max_chars: self.max_prompt_chars,
        })
    }
}

/// Verbalizer classification of the validation split: the label words compared at the
/// answer's first token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmEvalSection {
    /// The label words, in class order; each must be one token. Empty: no evaluation.
    pub labels: Vec<String>,
    pub label_column: String,
    pub batch_size: usize,
}

impl Default for LmEvalSection {
    fn default() -> Self {
        Self {
            labels: Vec::new(),
            label_column: "label".into(),
            batch_size: 8,
        }
    }
}

/// Training pairs and the held-out pairs (with their class ids where `[eval] labels` are set),
/// each with the index of the data row it came from (0-based, the header apart), so that a
/// run's batches and its held-out rows can be named (`cargo xtask bench --reference --model`
/// feeds them to the reference).
pub struct LmData {
    pub train: Vec<PromptResponse>,
    pub train_rows: Vec<usize>,
    pub validation: Vec<PromptResponse>,
    /// The class of each held-out pair by `eval.label_column`; empty without `[eval] labels`.
    pub validation_classes: Vec<usize>,
    pub validation_rows: Vec<usize>,
}

impl LmData {
    pub fn load(config: &LmConfig) -> Result<Self> {
        let data = &config.data;
        let path = data
            .train
            .clone()
            .ok_or_else(|| Error::Config("data.train is required".into()))?;
        let clip = |text: String| clip_chars(text, data.max_prompt_chars);
        let trained = |index: &usize| !crate::keywords::is_report_row(*index, data.report_every);
        let (pairs, classes) = if path.extension().is_none_or(|x| x != "csv") {
            // Required columns come first: each record's fields are prompt, response, others.
            let rows = crate::data::Dataset::read_jsonl(&path, &["prompt", "response"])?;
            let pairs: Vec<PromptResponse> = rows
                .records
                .into_iter()
                .map(|record| {
                    let mut fields = record.fields.into_iter();
                    PromptResponse {
                        prompt: clip(fields.next().unwrap_or_default()),
                        response: fields.next().unwrap_or_default(),
                    }
                })
                .collect();
            (pairs, None)
        } else {
            let template = |t: &Option<String>, field: &str| {
                t.as_deref()
                    .ok_or_else(|| Error::Config(format!("data.{field} is required for a CSV")))
                    .and_then(|t| Ok(graft_tokenizer::Template::parse(t)?))
            };
            let rows = crate::data::Dataset::read_csv(&path, &[])?;
            let prompts = rows.texts(&template(&data.prompt, "prompt")?)?;
            let responses = rows.texts(&template(&data.response, "response")?)?;
            let classes = if config.eval.labels.is_empty() || data.val_fraction == 0.0 {
                None
            } else {
                let labels = graft_tokenizer::LabelSet::new(config.eval.labels.clone())?;
                Some((
                    rows.labels(&config.eval.label_column, &labels)?,
                    labels.len(),
                ))
            };
            let pairs = prompts
                .into_iter()
                .zip(responses)
                .map(|(prompt, response)| PromptResponse {
                    prompt: clip(prompt),
                    response,
                })
                .collect();
            (pairs, classes)
        };
        // The rows training may see; the split below picks positions in this list.
        let kept: Vec<usize> = (0..pairs.len()).filter(trained).collect();
        let (train, held_out) = if data.val_fraction == 0.0 {
            ((0..kept.len()).collect(), Vec::new())
        } else {
            // Stratified by class where there are labels; otherwise one class, a seeded draw.
            let (of_kept, count) = match &classes {
                Some((all, count)) => (kept.iter().map(|&i| all[i]).collect(), *count),
                None => (vec![0; kept.len()], 1),
            };
            crate::data::stratified_split(&of_kept, count, data.val_fraction, config.train.seed)?
        };
        Ok(Self {
            train: train.iter().map(|&k| pairs[kept[k]].clone()).collect(),
            train_rows: train.iter().map(|&k| kept[k]).collect(),
            validation: held_out.iter().map(|&k| pairs[kept[k]].clone()).collect(),
            validation_classes: match &classes {
                Some((all, _)) => held_out.iter().map(|&k| all[kept[k]]).collect(),
                None => Vec::new(),
            },
            validation_rows: held_out.iter().map(|&k| kept[k]).collect(),
        })
    }
}

/// The verbalizer's evaluation of `data`'s held-out pairs by `eval`'s label words, and the
/// metrics to report: with the rows (by data-file index), batch size, seconds and rows/s.
pub fn score_held_out(
    lm: &CausalLm,
    data: &LmData,
    eval: &LmEvalSection,
) -> Result<(crate::metrics::Evaluation, serde_json::Value)> {
    let started = std::time::Instant::now();
    let prompts: Vec<String> = data.validation.iter().map(|p| p.prompt.clone()).collect();
    let evaluation = evaluate_verbalizer(
        lm,
        &prompts,
        &data.validation_classes,
        &eval.labels,
        eval.batch_size,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let mut metrics =
        serde_json::to_value(&evaluation).map_err(|e| Error::Config(e.to_string()))?;
    metrics["rows"] = json!(data.validation_rows);
    metrics["batch_size"] = json!(eval.batch_size);
    metrics["seconds"] = json!(seconds);
    metrics["rows_per_s"] = json!(evaluation.count as f64 / seconds.max(1e-9));
    Ok((evaluation, metrics))
}

/// Verbalizer classification of the held-out `prompts` (of classes `truth`) with the label
/// words `labels`, in batches of `batch_size`.
pub fn evaluate_verbalizer(
    lm: &CausalLm,
    prompts: &[String],
    truth: &[usize],
    labels: &[String],
    batch_size: usize,
) -> Result<crate::metrics::Evaluation> {
    let mut ids = Vec::with_capacity(labels.len());
    for label in labels {
        match lm.tokenizer.encode_no_special(label)?.as_slice() {
            [one] => ids.push(*one),
            other => {
                return Err(Error::Config(format!(
                    "label word {label:?} is {} tokens; a verbalizer needs one token per label",
                    other.len()
                )))
            }
        }
    }
    let predicted = lm.verbalize(prompts, &ids, batch_size)?;
    Ok(crate::metrics::evaluate(
        truth,
        &predicted,
        labels.len(),
        0.0,
    ))
}

impl LmConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_error(path))?;
        let config: Self = toml::from_str(&text).map_err(|e| {
            Error::Config(format!(
                "{}: {}",
                path.display(),
                graft_peft::config::with_suggestion(&e.to_string())
            ))
        })?;
        let checked = if config.train.max_steps == 0 || config.model.max_len == 0 {
            Err(Error::Config(
                "train.max_steps and model.max_len must be at least 1".into(),
            ))
        } else {
            config.train.validate()
        };
        checked.map_err(crate::config::in_file(path))?;
        Ok(config)
    }

    pub fn method_name(&self) -> Result<&str> {
        crate::config::method_name(&self.method)
    }

    /// The method's own settings as JSON (the table without `name`).
    pub fn method_settings(&self) -> serde_json::Value {
        crate::config::method_settings(&self.method)
    }

    /// The chat template with its options.
    pub fn template(&self) -> Result<ChatTemplate> {
        let template = ChatTemplate::parse(&self.model.template)?;
        Ok(match &self.model.system {
            Some(system) => template.with_system(system.clone())?,
            None => template,
        })
    }
}

/// Causal-LM fine-tuning as the training loop drives it.
pub struct LmTask {
    lm: CausalLm,
    data: LmData,
    config: LmConfig,
    memory: ModelMemory,
}

/// The process's resident memory around building the model, in MiB.
#[derive(Debug, Clone, Copy, Default)]
struct ModelMemory {
    /// Before the model (and the tokenizer) were loaded: what `graft inspect`'s estimate of a
    /// step comes on top of.
    rss_before_model: Option<f64>,
    rss_after_model: Option<f64>,
    /// The peak while building it.
    peak_rss_building: Option<f64>,
}

impl LmTask {
    /// The decoder `lm` on `data` with `config`'s settings (the model it names is `lm`'s).
    pub fn new(lm: CausalLm, data: LmData, config: LmConfig) -> Self {
        Self {
            lm,
            data,
            config,
            memory: ModelMemory::default(),
        }
    }

    /// `pairs` as one batch, as the task's tokenizer, template and length encode them.
    fn encode(&self, pairs: &[PromptResponse]) -> Result<CausalBatch> {
        let spec = &self.lm.spec;
        Ok(encode_causal(
            &self.lm.tokenizer,
            &spec.template,
            pairs,
            spec.max_len,
        )?)
    }

    /// The mean loss over the labelled tokens of the held-out pairs.
    fn held_out_loss(&self) -> Result<(f64, usize)> {
        let (mut sum, mut tokens) = (0.0, 0);
        for chunk in self
            .data
            .validation
            .chunks(self.config.eval.batch_size.max(1))
        {
            let batch = self.encode(chunk)?;
            let units = labelled(&batch);
            let loss = graft_model::ops::without_grad(|| self.lm.loss(&batch))?;
            sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * units as f64;
            tokens += units;
        }
        Ok((sum / tokens.max(1) as f64, tokens))
    }
}

/// The tokens of `batch` that take a loss (the responses').
fn labelled(batch: &CausalBatch) -> usize {
    batch.labels.iter().filter(|&&l| l >= 0).count()
}

impl fit::Task for LmTask {
    type Batch = CausalBatch;

    fn examples(&self) -> usize {
        self.data.train.len()
    }

    fn batch(&self, rows: &[usize]) -> Result<CausalBatch> {
        let pairs: Vec<PromptResponse> = rows.iter().map(|&i| self.data.train[i].clone()).collect();
        self.encode(&pairs)
    }

    fn tokens(&self, batch: &CausalBatch) -> usize {
        batch.batch * batch.seq_len
    }

    fn units(&self, batch: &CausalBatch) -> usize {
        labelled(batch)
    }

    /// By labelled tokens: a step of micro-batches has the gradients of the whole batch.
    fn accumulation(&self) -> Accumulation {
        Accumulation::ByUnits
    }

    fn loss_and_grads(
        &self,
        batch: &CausalBatch,
        share: Share,
    ) -> Result<(f64, candle_core::backprop::GradStore)> {
        let checkpointing = self.config.model.checkpointing;
        let (loss, grads) = self
            .lm
            .loss_and_grads(batch, checkpointing, share.factor())?;
        let value = share
            .weigh(&loss)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        Ok((value, grads))
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.lm.trainable()
    }

    fn param_groups(&self, train: &crate::config::TrainSection) -> Vec<ParamGroup> {
        vec![ParamGroup {
            vars: self.lm.trainable().into_iter().map(|(_, v)| v).collect(),
            lr: train.lr,
            weight_decay: train.weight_decay,
        }]
    }

    fn adapter(&self) -> &dyn graft_peft::Adapter {
        self.lm.adapter.as_ref()
    }

    fn adapter_mut(&mut self) -> &mut dyn graft_peft::Adapter {
        self.lm.adapter.as_mut()
    }

    fn scales_loss(&self) -> bool {
        self.lm.spec.dtype == crate::config::Precision::F16
    }

    fn evaluate(&mut self) -> Result<Option<Scored>> {
        if self.data.validation.is_empty() {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let labels = &self.config.eval.labels;
        if labels.is_empty() || self.data.validation_classes.is_empty() {
            let (loss, tokens) = self.held_out_loss()?;
            return Ok(Some(Scored {
                metrics: json!({
                    "loss": loss,
                    "tokens": tokens,
                    "count": self.data.validation.len(),
                    "rows": self.data.validation_rows,
                    "seconds": started.elapsed().as_secs_f64(),
                }),
                score: -loss,
                summary: format!("held-out loss {loss:.4} over {tokens} tokens"),
                curve: ("held-out loss", loss),
            }));
        }
        let (evaluation, metrics) = score_held_out(&self.lm, &self.data, &self.config.eval)?;
        Ok(Some(Scored {
            summary: format!(
                "validation ({} rows, verbalizer {labels:?}): accuracy {:.4}  precision {:.4}  recall {:.4}  F1 {:.4}",
                evaluation.count,
                evaluation.accuracy,
                evaluation.precision,
                evaluation.recall,
                evaluation.f1
            ),
            score: evaluation.f1,
            curve: ("validation F1", evaluation.f1),
            metrics,
        }))
    }

    /// The adapter goes to the run folder itself, where `generate`, `logits` and `eval-lm`
    /// open it.
    fn save(&self, run: &RunDir) -> Result<()> {
        self.lm.save(&run.root)
    }

    /// The config's data fields and the label fields that pick the held-out pairs' classes; the
    /// pairs with the data rows they came from.
    fn data_identity(&self) -> Result<fit::DataIdentity> {
        let data = &self.data;
        let mut hasher = fit::DataHasher::default();
        for (pairs, rows) in [
            (&data.train, &data.train_rows),
            (&data.validation, &data.validation_rows),
        ] {
            hasher.number(pairs.len());
            for (pair, &row) in pairs.iter().zip(rows) {
                hasher
                    .number(row)
                    .part(pair.prompt.as_bytes())
                    .part(pair.response.as_bytes());
            }
        }
        hasher.number(data.validation_classes.len());
        for &class in &data.validation_classes {
            hasher.number(class);
        }
        let mut fields = json!({});
        fit::DataIdentity::fields("data", &self.config.data, &mut fields)?;
        let eval = &self.config.eval;
        fields["eval.labels"] = json!(eval.labels);
        fields["eval.label_column"] = json!(eval.label_column);
        Ok(fit::DataIdentity {
            fields,
            train_examples: data.train.len(),
            held_out_examples: data.validation.len(),
            content_sha256: hasher.finish(),
        })
    }

    fn report(&self, state: &fit::LoopState, report: &mut serde_json::Value) {
        report["method"] = json!(self.lm.spec.method);
        report["trainable_params"] = json!(fit::value_count(&self.lm.trainable()));
        report["rss_before_model_mb"] = json!(self.memory.rss_before_model);
        report["rss_after_model_mb"] = json!(self.memory.rss_after_model);
        report["peak_rss_building_model_mb"] = json!(self.memory.peak_rss_building);
        report["dtype"] = json!(self.lm.spec.dtype);
        // Which tokenizer fed which model (a --random-init shape takes the recipe's tokenizer).
        report["model"] = json!(self.lm.spec.model);
        report["random_init_seed"] = json!(self.lm.spec.random_init);
        report["tokenizer"] = json!(self.lm.spec.tokenizer);
        report["tokenizer_vocab"] = json!(self.lm.tokenizer.vocab_size());
        report["model_vocab"] = json!(self.lm.model.spec().vocab_size);
        report["checkpointing"] = json!(self.config.model.checkpointing);
        // Each step's batch as indexes of rows in the data file.
        report["batch_rows"] = json!(state
            .batches
            .iter()
            .map(|b| b
                .iter()
                .map(|&p| self.data.train_rows[p])
                .collect::<Vec<_>>())
            .collect::<Vec<_>>());
    }
}

/// A finished causal-LM run.
pub struct LmOutcome {
    pub run_dir: PathBuf,
    /// The best evaluation's metrics and step, if anything was held out.
    pub best: Option<fit::Best>,
    pub losses: Vec<f64>,
}

/// The config with every path absolute and the model resolved to `model`: what a run folder
/// records, so that `--resume` continues it from any working directory.
pub fn resolved(config: &LmConfig, model: &Path) -> Result<LmConfig> {
    let mut resolved = config.clone();
    resolved.model.path = Some(crate::config::absolute(model)?);
    resolved.model.tokenizer = Some(crate::config::absolute(
        &config
            .model
            .tokenizer
            .clone()
            .unwrap_or_else(|| LmSpec::default_tokenizer(model)),
    )?);
    resolved.data.train = config
        .data
        .train
        .as_deref()
        .map(crate::config::absolute)
        .transpose()?;
    Ok(resolved)
}

/// For a recipe run on another model's shape (`--random-init`): a `target_modules` list that
/// names none of the shape's projections (the recipe's `q_proj` on a ChatGLM shape) is dropped,
/// so that the method takes PEFT's default for the shape's architecture; returns a note saying
/// so, if it was.
pub fn fit_targets_to_shape(config: &mut LmConfig) -> Result<Option<String>> {
    let Some(model) = &config.model.path else {
        return Ok(None);
    };
    let Some(targets) = config.method.get("target_modules") else {
        return Ok(None);
    };
    let names: Vec<String> = match targets.as_array() {
        Some(list) => list
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        None => return Ok(None),
    };
    let (plan, _) = graft_model::load::read_plan(model)?;
    let sites = plan.sites();
    let chosen = graft_peft::TargetModules::Names(names.clone());
    if chosen.select(config.method_name()?, &sites).is_ok() {
        return Ok(None);
    }
    config.method.remove("target_modules");
    Ok(Some(format!(
        "target_modules {names:?} name no projection of {}: the method's default for `{}` is used",
        model.display(),
        plan.spec.model_type
    )))
}

impl LmConfig {
    /// The task file of the adapter this config trains (its model resolved, see [`resolved`]).
    pub fn spec(&self) -> Result<LmSpec> {
        let model = self
            .model
            .path
            .clone()
            .ok_or_else(|| Error::Config("the resolved config lacks model.path".into()))?;
        Ok(LmSpec {
            method: self.method_name()?.to_string(),
            tokenizer: self
                .model
                .tokenizer
                .clone()
                .unwrap_or_else(|| LmSpec::default_tokenizer(&model)),
            model,
            template: self.template()?,
            max_len: self.model.max_len,
            dtype: self.model.dtype,
            quantize: self.model.quantize,
            prompt: self.data.prompt_source(),
            random_init: self.model.random_init.then_some(self.train.seed),
            pad_to_max_len: self.model.pad_to_max_len,
        })
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("writing the config: {e}")))
    }
}

/// Trains `config` (resolved: see [`resolved`]) with the method from `registry` into the run
/// folder `out`: config.toml, metrics.jsonl, checkpoints, curves.svg, train.json, eval.json and
/// the adapter (the best by evaluation, else the last).
pub fn train(config: &LmConfig, registry: &Registry, out: &Path) -> Result<LmOutcome> {
    // Data, plugin and model are read and checked before anything is written.
    let data = LmData::load(config)?;
    let task = task(config, registry, data)?;
    let run = RunDir::create(out, LM_TASK_FILE)?;
    run.write(RunDir::CONFIG, &config.to_toml()?)?;
    run_task(task, run, None)
}

/// Continues the run in `dir` from its newest checkpoint, with the config it was started with
/// (plugins from `registry`, never from the run folder).
pub fn resume(dir: &Path, registry: &Registry) -> Result<LmOutcome> {
    let config = LmConfig::from_file(&dir.join(RunDir::CONFIG))?;
    let data = LmData::load(&config)?;
    let checkpoint = fit::latest_checkpoint(dir)?;
    let task = task(&config, registry, data)?;
    let run = RunDir::reopen(dir, checkpoint.state.done)?;
    run_task(task, run, Some(checkpoint))
}

/// The decoder with a fresh adapter, seeded by the config.
fn task(config: &LmConfig, registry: &Registry, data: LmData) -> Result<LmTask> {
    if data.train.is_empty() {
        return Err(Error::Config("no prompt/response pairs to train on".into()));
    }
    let plugin = registry.get(config.method_name()?)?;
    let rss_before_model = fit::rss_mb();
    let lm = CausalLm::create(
        config.spec()?,
        plugin.method.as_ref(),
        &config.method_settings(),
        &graft_model::default_device()?,
        config.train.seed,
        config.train.max_steps,
    )?;
    // What building the model held at its peak (a quantized model's weights are drawn or
    // read in f32 one at a time), and from here the steps' own peak.
    let model_built = ModelMemory {
        rss_before_model,
        rss_after_model: fit::rss_mb(),
        peak_rss_building: fit::start_peak_rss_window(),
    };
    Ok(LmTask {
        lm,
        data,
        config: config.clone(),
        memory: model_built,
    })
}

fn run_task(
    mut task: LmTask,
    mut run: RunDir,
    resume_from: Option<checkpoint::Checkpoint<fit::LoopState>>,
) -> Result<LmOutcome> {
    let lm = &task.lm;
    let trainable = fit::value_count(&lm.trainable());
    let t = &task.config.train;
    let mut intro = format!(
        "{} on {} in {}: {trainable} trainable values, {} pairs ({} held out), {} steps of {}",
        lm.spec.method,
        lm.spec.model.display(),
        lm.spec.dtype,
        task.data.train.len(),
        task.data.validation.len(),
        t.max_steps,
        t.batch_size * t.grad_accum.max(1),
    );
    if let Some(family) = lm.spec.quantize {
        intro = format!(
            "{intro}\n{}",
            crate::lm::quantized_summary(family, &lm.model)
        );
    }
    let train = task.config.train.clone();
    let state = fit::fit(
        &mut task,
        &train,
        train.max_steps,
        &mut run,
        resume_from,
        &intro,
    )?;
    Ok(LmOutcome {
        run_dir: run.root.clone(),
        best: state.best.clone(),
        losses: state.losses(),
    })
}
