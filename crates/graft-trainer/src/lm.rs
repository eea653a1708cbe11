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
        let ids = encode_prompt(&self.tokenizer, &self.spec.template, prompt)?;
        let stop: Vec<u32> = self
            .spec
            .template
            .stop_token_id(&self.tokenizer)?
            .into_iter()
            .collect();
        let mut shown = 0;
        let mut tokens = Vec::new();
        let mut error = None;
        generate(
            &self.model,
            self.hooks(),
            &ids,
            max_new_tokens,
            &stop,
            sampling,
            &mut |token| {
                if stop.contains(&token) {
                    return;
                }
                tokens.push(token);
                match self.tokenizer.decode(&tokens) {
                    Ok(text) => {
                        // Print whole characters only: a token may end inside one.
                        if text.len() > shown && !text.ends_with('\u{FFFD}') {
                            on_text(&text[shown..]);
                            shown = text.len();
                        }
                    }
                    Err(e) => error = Some(e),
                }
            },
        )?;
        if let Some(e) = error {
            return Err(e.into());
        }
        Ok(self.tokenizer.decode(&tokens)?)
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
