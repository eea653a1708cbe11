//! A decoder with its method attached, for causal-LM fine-tuning and generation: what
//! `graft train-lm`, `graft generate` and the decoder checks of every method share.
use crate::error::io_error;
use crate::task::{apply_merge, attach_saved, read_saved, Attachment};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use graft_model::decoder::{causal_lm_loss, Decoder, DecoderInputs};
use graft_model::generate::{generate, Sampling};
use graft_peft::adapter;
use graft_peft::loader::Registry;
use graft_peft::{Adapter, Method};
use graft_tokenizer::{encode_prompt, CausalBatch, ChatTemplate, Padding, TextTokenizer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What an adapter folder of a causal LM needs besides PEFT's files: `graft_lm_task.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmSpec {
    pub method: String,
    /// Base model: a Hugging Face folder or a Llama-family `.gguf` file.
    pub model: PathBuf,
    /// tokenizer.json; by default the one in the model folder.
    pub tokenizer: PathBuf,
    pub template: ChatTemplate,
    pub max_len: usize,
}

pub const LM_TASK_FILE: &str = "graft_lm_task.json";

impl LmSpec {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(LM_TASK_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
        serde_json::from_str(&text).map_err(|e| Error::Adapter {
            path,
            reason: format!("not a graft causal-LM task file: {e}"),
        })
    }

    /// The tokenizer beside a model folder, or beside a GGUF file.
    pub fn default_tokenizer(model: &Path) -> PathBuf {
        if model.is_file() {
            model.with_file_name("tokenizer.json")
        } else {
            model.join("tokenizer.json")
        }
    }
}

pub struct CausalLm {
    pub model: Decoder,
    pub adapter: Box<dyn Adapter>,
    pub tokenizer: TextTokenizer,
    pub spec: LmSpec,
    peft_type: String,
    full_model: bool,
    merged: bool,
}

fn attachment(model: &Decoder, tokenizer: TextTokenizer) -> Attachment {
    Attachment {
        info: model.info(),
        sites: model.sites(),
        base_tensors: model.named_tensors(),
        tokenizer,
    }
}

impl CausalLm {
    /// A fresh model for training: base decoder and a new adapter.
    pub fn create(
        spec: LmSpec,
        method: &dyn Method,
        settings: &serde_json::Value,
        device: &Device,
        dtype: DType,
        seed: u64,
        total_steps: usize,
    ) -> Result<Self> {
        let model = Decoder::open(&spec.model, dtype, device)?;
        let tokenizer = TextTokenizer::from_file(&spec.tokenizer, spec.max_len, Padding::Longest)?;
        let attached = attachment(&model, tokenizer);
        let adapter = attached.with_context(device, dtype, seed, total_steps, |ctx| {
            method.create(settings, ctx)
        })?;
        Ok(Self::assemble(
            spec,
            method,
            model,
            adapter,
            attached.tokenizer,
        ))
    }

    /// A trained model from an adapter folder written by graft (or, for full fine-tuning, a
    /// model folder).
    pub fn open(dir: &Path, registry: &Registry, device: &Device) -> Result<Self> {
        let spec = LmSpec::read(dir)?;
        let plugin = registry.get(&spec.method)?;
        let method = plugin.method.as_ref();
        if method.saves_full_model() {
            let model = Decoder::open(dir, DType::F32, device)?;
            let tokenizer =
                TextTokenizer::from_file(&spec.tokenizer, spec.max_len, Padding::Longest)?;
            let attached = attachment(&model, tokenizer);
            let adapter = attached
                .with_context(device, DType::F32, 0, 0, |ctx| {
                    method.load(&serde_json::json!({}), &Default::default(), ctx)
                })
                .map_err(|e| Error::Adapter {
                    path: dir.to_path_buf(),
                    reason: e.to_string(),
                })?;
            return Ok(Self::assemble(
                spec,
                method,
                model,
                adapter,
                attached.tokenizer,
            ));
        }
        let saved = read_saved(dir, method, &spec.method, device)?;
        let model = Decoder::open(&spec.model, DType::F32, device)?;
        let tokenizer = TextTokenizer::from_file(&spec.tokenizer, spec.max_len, Padding::Longest)?;
        let attached = attachment(&model, tokenizer);
        let adapter = attach_saved(dir, &saved, method, &attached, device)?;
        Ok(Self::assemble(
            spec,
            method,
            model,
            adapter,
            attached.tokenizer,
        ))
    }

    fn assemble(
        spec: LmSpec,
        method: &dyn Method,
        model: Decoder,
        adapter: Box<dyn Adapter>,
        tokenizer: TextTokenizer,
    ) -> Self {
        Self {
            model,
            adapter,
            tokenizer,
            spec,
            peft_type: method.peft_type().to_string(),
            full_model: method.saves_full_model(),
            merged: false,
        }
    }

    /// Every tensor the optimizer updates, under its adapter-file key.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.adapter.trainable()
    }

    /// The hooks a forward pass runs: the adapter's, unless it is merged into the weights.
    pub fn hooks(&self) -> &dyn graft_model::Hooks {
        if self.merged {
            &graft_model::NoHooks
        } else {
            self.adapter.as_ref()
        }
    }

    fn inputs(&self, batch: &CausalBatch) -> Result<DecoderInputs> {
        let shape = (batch.batch, batch.seq_len);
        let device = self.model.device();
        Ok(DecoderInputs {
            input_ids: Tensor::from_slice(&batch.input_ids, shape, device)?,
            attention_mask: Some(Tensor::from_slice(&batch.attention_mask, shape, device)?),
        })
    }

    /// Logits `[batch, seq, vocab]` of every position of a batch.
    pub fn logits(&self, batch: &CausalBatch) -> Result<Tensor> {
        let hidden = self
            .model
            .forward(&self.inputs(batch)?, self.hooks(), None)?;
        Ok(self.model.lm_head(&hidden, self.hooks())?)
    }

    /// Mean next-token cross-entropy on the labelled positions, plus the method's extra term.
    pub fn loss(&self, batch: &CausalBatch) -> Result<Tensor> {
        let logits = self.logits(batch)?;
        let labels = Tensor::from_slice(
            &batch.labels,
            (batch.batch, batch.seq_len),
            self.model.device(),
        )?;
        let mut loss = causal_lm_loss(&logits, &labels)?;
        if let Some(extra) = self.adapter.extra_loss()? {
            loss = (loss + extra)?;
        }
        Ok(loss)
    }

    /// The answer to `prompt` (rendered with the task's chat template), up to `max_new_tokens`
    /// tokens; `on_text` receives the text as it grows.
    pub fn generate(
        &self,
        prompt: &str,
        max_new_tokens: usize,
        sampling: &Sampling,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<String> {
        generate_text(
            &self.model,
            self.hooks(),
            &self.tokenizer,
            &self.spec.template,
            prompt,
            max_new_tokens,
            sampling,
            on_text,
        )
    }

    /// Saves the adapter folder: PEFT's two files (full fine-tuning: a model folder with the
    /// tokenizer) plus graft's task file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.full_model {
            self.save_model(dir)?;
        } else {
            let mut config = serde_json::json!({
                "peft_type": self.peft_type,
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": self.spec.model.display().to_string(),
                "inference_mode": true,
                "revision": null,
            });
            if let (Some(out), serde_json::Value::Object(fields)) =
                (config.as_object_mut(), self.adapter.config_json())
            {
                out.extend(fields);
            }
            adapter::save(dir, &config, &self.adapter.tensors()?)?;
        }
        let text =
            serde_json::to_string_pretty(&self.spec).map_err(|e| Error::Config(e.to_string()))?;
        adapter::write_atomic(&dir.join(LM_TASK_FILE), text.as_bytes())?;
        Ok(())
    }

    /// A Hugging Face model folder of the model as it runs now (full fine-tuning's tensors, or
    /// a merged adapter), with its tokenizer.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save(dir, self.hooks())?;
        let target = dir.join("tokenizer.json");
        if self.spec.tokenizer != target {
            std::fs::copy(&self.spec.tokenizer, &target).map_err(io_error(&self.spec.tokenizer))?;
        }
        Ok(())
    }

    /// Moves the adapter into the base weights (`merge`) or back out of them.
    pub fn set_merged(&mut self, merge: bool) -> Result<()> {
        if merge == self.merged || self.full_model {
            return Ok(());
        }
        apply_merge(
            self.adapter.as_ref(),
            &self.spec.method,
            merge,
            &mut self.model,
        )?;
        self.merged = merge;
        Ok(())
    }
}

/// A causal-LM training run's configuration (TOML; see `configs/knowledge-adalora.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LmConfig {
    pub model: LmModelSection,
    pub data: LmDataSection,
    /// The optimiser settings of classification runs; `max_steps` counts steps, `epochs` is
    /// unused (a run of `max_steps` cycles through the pairs).
    pub train: crate::config::TrainSection,
    /// `name` picks the plugin; every other key is the method's own (PEFT's field names).
    pub method: toml::Table,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmModelSection {
    /// A Hugging Face folder or a `.gguf` file; empty: fetch `name`.
    pub path: Option<PathBuf>,
    /// A model graft knows how to fetch (`smollm2`), used when `path` is not set.
    pub name: String,
    /// tokenizer.json; empty: beside the model.
    pub tokenizer: Option<PathBuf>,
    /// `plain`, `chatglm2` or `chatml`.
    pub template: String,
    /// ChatML's system turn.
    pub system: Option<String>,
    pub max_len: usize,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LmDataSection {
    /// JSONL of `{"prompt": ..., "response": ...}`.
    pub train: Option<PathBuf>,
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
        if config.train.max_steps == 0 || config.train.batch_size == 0 {
            return Err(Error::Config(format!(
                "{}: train.max_steps and train.batch_size must be at least 1",
                path.display()
            )));
        }
        Ok(config)
    }

    pub fn method_name(&self) -> Result<&str> {
        self.method
            .get("name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Config("[method] needs `name`, e.g. name = \"lora\"".into()))
    }

    /// The method's own settings as JSON (the table without `name`).
    pub fn method_settings(&self) -> serde_json::Value {
        let mut table = self.method.clone();
        table.remove("name");
        serde_json::to_value(table).unwrap_or(serde_json::Value::Null)
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

/// What a step of [`train_lm`] reports.
pub struct LmStep {
    pub step: usize,
    pub loss: f64,
    pub seconds: f64,
}

/// Trains `lm` on `pairs` for `train.max_steps` AdamW steps (batches cycle through the pairs),
/// with warm-up and schedule, gradient clipping and the method's after-step hook; returns the
/// losses. `on_step` sees every step.
pub fn train_lm(
    lm: &mut CausalLm,
    pairs: &[graft_tokenizer::PromptResponse],
    train: &crate::config::TrainSection,
    on_step: &mut dyn FnMut(&LmStep),
) -> Result<Vec<f64>> {
    use crate::optim::{global_norm, lr_factor, scale_grads, AdamW, ParamGroup};
    if pairs.is_empty() {
        return Err(Error::Config("no prompt/response pairs to train on".into()));
    }
    let trainable = lm.trainable();
    let vars: Vec<Var> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(
        vec![ParamGroup {
            vars: vars.clone(),
            lr: train.lr,
            weight_decay: train.weight_decay,
        }],
        train.beta1,
        train.beta2,
        train.eps,
    )?;
    let steps = train.max_steps;
    let warmup = (steps as f64 * train.warmup_ratio).round() as usize;
    lm.adapter.set_training(true);
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let started = std::time::Instant::now();
        let batch: Vec<_> = (0..train.batch_size)
            .map(|i| pairs[(step * train.batch_size + i) % pairs.len()].clone())
            .collect();
        let encoded = graft_tokenizer::encode_causal(
            &lm.tokenizer,
            &lm.spec.template,
            &batch,
            lm.spec.max_len,
        )?;
        let loss = lm.loss(&encoded)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Config(format!(
                "the loss is {value} at step {}",
                step + 1
            )));
        }
        let mut grads = loss.backward()?;
        if train.max_grad_norm > 0.0 {
            let norm = global_norm(&grads, &vars)?;
            if norm > train.max_grad_norm {
                scale_grads(&mut grads, &vars, train.max_grad_norm / norm)?;
            }
        }
        optimizer.step(&grads, lr_factor(train.schedule, step, steps, warmup))?;
        lm.adapter.after_step(step + 1, &grads)?;
        losses.push(value);
        on_step(&LmStep {
            step: step + 1,
            loss: value,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    lm.adapter.set_training(false);
    Ok(losses)
}

/// The answer of `model` (with `hooks`) to `prompt` rendered with `template`, up to
/// `max_new_tokens` tokens, stopping at the template's stop token; `on_text` receives the text
/// as it grows.
#[allow(clippy::too_many_arguments)]
pub fn generate_text(
    model: &Decoder,
    hooks: &dyn graft_model::Hooks,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    prompt: &str,
    max_new_tokens: usize,
    sampling: &Sampling,
    on_text: &mut dyn FnMut(&str),
) -> Result<String> {
    let ids = encode_prompt(tokenizer, template, prompt)?;
    let stop: Vec<u32> = template.stop_token_id(tokenizer)?.into_iter().collect();
    let mut shown = 0;
    let mut tokens = Vec::new();
    let mut error = None;
    generate(
        model,
        hooks,
        &ids,
        max_new_tokens,
        &stop,
        sampling,
        &mut |token| {
            if stop.contains(&token) {
                return;
            }
            tokens.push(token);
            match tokenizer.decode(&tokens) {
                // Whole characters only: a token may end inside one.
                Ok(text) if !text.ends_with('\u{FFFD}') => {
                    if let Some(new) = text.get(shown..).filter(|n| !n.is_empty()) {
                        on_text(new);
                        shown = text.len();
                    }
                }
                Ok(_) => {}
                Err(e) => error = Some(e),
            }
        },
    )?;
    if let Some(e) = error {
        return Err(e.into());
    }
    Ok(tokenizer.decode(&tokens)?)
}
