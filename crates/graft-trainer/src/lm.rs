//! A decoder with its method attached, for causal-LM fine-tuning and generation: what
//! `graft train-lm`, `graft generate` and the decoder checks of every method share.
use crate::error::io_error;
use crate::task::{
    adapter_config, apply_merge, attach_full, attach_saved, copy_tokenizer, read_saved, Attachment,
};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use graft_model::decoder::{Decoder, DecoderInputs};
use graft_model::generate::{generate, Sampling};
use graft_model::loss::labelled_rows;
use graft_model::quant::Quantization;
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
    /// tokenizer.json (or a SentencePiece tokenizer.model); by default the model folder's.
    pub tokenizer: PathBuf,
    pub template: ChatTemplate,
    pub max_len: usize,
    /// The dtype the base was trained in, and is loaded in again.
    #[serde(default)]
    pub dtype: crate::config::Precision,
    /// The family the base's projection weights were kept quantized in, and are again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<Quantization>,
    /// How the training prompts were rendered from CSV columns (none for JSONL pairs): what
    /// renders a new row's prompt the same way (the keyword extractor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<PromptSource>,
}

/// A CSV prompt: the template over the columns and the cut applied after rendering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSource {
    pub template: String,
    /// Rendered prompts are cut to this many bytes, at a character boundary (0: never).
    pub max_chars: usize,
}

/// `text` cut to at most `max_chars` bytes at a character boundary (0: not cut).
pub fn clip_chars(mut text: String, max_chars: usize) -> String {
    if max_chars > 0 && text.len() > max_chars {
        let mut end = max_chars;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

pub const LM_TASK_FILE: &str = "graft_lm_task.json";

impl LmSpec {
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.join(LM_TASK_FILE).is_file() && dir.join(crate::task::TASK_FILE).is_file() {
            return Err(Error::Adapter {
                path: dir.to_path_buf(),
                reason: format!(
                    "this is a classification adapter ({}); a language-model adapter (written by `graft train-lm`) has {LM_TASK_FILE}",
                    crate::task::TASK_FILE
                ),
            });
        }
        crate::config::read_task_file(dir, LM_TASK_FILE, "causal-LM task")
    }

    /// The same task with its model and tokenizer paths absolute: what an adapter folder
    /// records, so that it opens from any working directory.
    pub fn with_absolute_paths(&self) -> Result<Self> {
        Ok(Self {
            model: crate::config::absolute(&self.model)?,
            tokenizer: crate::config::absolute(&self.tokenizer)?,
            ..self.clone()
        })
    }

    /// The tokenizer beside a model folder, or beside a GGUF file.
    pub fn default_tokenizer(model: &Path) -> PathBuf {
        match model.parent() {
            Some(dir) if model.is_file() => graft_tokenizer::tokenizer_in(dir),
            _ => graft_tokenizer::tokenizer_in(model),
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

/// The decoder at `model` and what a method sees of it, with the task's tokenizer.
fn load_base(
    model: &Path,
    spec: &LmSpec,
    dtype: DType,
    device: &Device,
) -> Result<(Decoder, Attachment)> {
    let decoder = Decoder::open_quantized(model, dtype, spec.quantize, device)?;
    let tokenizer = TextTokenizer::from_file(&spec.tokenizer, spec.max_len, Padding::Longest)?;
    let attached = Attachment {
        info: decoder.info(),
        sites: decoder.sites(),
        base_tensors: decoder.named_tensors(),
        quantized: decoder
            .quantized()
            .into_iter()
            .map(|(key, _)| key.to_string())
            .collect(),
        tokenizer,
    };
    Ok((decoder, attached))
}

impl CausalLm {
    /// A fresh model for training: base decoder and a new adapter.
    pub fn create(
        spec: LmSpec,
        method: &dyn Method,
        settings: &serde_json::Value,
        device: &Device,
        seed: u64,
        total_steps: usize,
    ) -> Result<Self> {
        if let (true, Some(family)) = (method.saves_full_model(), spec.quantize) {
            return Err(Error::Config(format!(
                "method `{}` trains every base weight, and a base quantized to {family} is \
                 frozen; train it without `quantize`, or use a method that trains an adapter",
                method.name()
            )));
        }
        let dtype = spec.dtype.dtype();
        let (model, attached) = load_base(&spec.model, &spec, dtype, device)?;
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
        Self::open_as(dir, registry, device, None)
    }

    /// [`CausalLm::open`], the base in `dtype` instead of the one it was trained in.
    pub fn open_as(
        dir: &Path,
        registry: &Registry,
        device: &Device,
        dtype: Option<crate::config::Precision>,
    ) -> Result<Self> {
        let mut spec = LmSpec::read(dir)?;
        if let Some(dtype) = dtype {
            spec.dtype = dtype;
        }
        let plugin = registry.get(&spec.method)?;
        let method = plugin.method.as_ref();
        if method.saves_full_model() {
            let (model, attached) = load_base(dir, &spec, spec.dtype.dtype(), device)?;
            let adapter = attach_full(dir, method, &attached, device)?;
            return Ok(Self::assemble(
                spec,
                method,
                model,
                adapter,
                attached.tokenizer,
            ));
        }
        let saved = read_saved(dir, method, &spec.method, device)?;
        let (model, attached) = load_base(&spec.model, &spec, spec.dtype.dtype(), device)?;
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

    /// Next-token logits `[vocab]` (f32) after `prompt` rendered with the task's template.
    pub fn next_token_logits(&self, prompt: &str) -> Result<Tensor> {
        let ids = encode_prompt(&self.tokenizer, &self.spec.template, prompt)?;
        let n = ids.len();
        let inputs = DecoderInputs {
            input_ids: Tensor::from_vec(ids, (1, n), self.model.device())?,
            attention_mask: None,
        };
        let logits = graft_model::ops::without_grad(|| {
            let hidden = self.model.forward(&inputs, self.hooks(), None)?;
            self.model
                .lm_head(&hidden.narrow(1, n - 1, 1)?, self.hooks())
        })?;
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    /// Logits `[batch, seq, vocab]` of every position of a batch.
    pub fn logits(&self, batch: &CausalBatch) -> Result<Tensor> {
        let hidden = self
            .model
            .forward(&self.inputs(batch)?, self.hooks(), None)?;
        Ok(self.model.lm_head(&hidden, self.hooks())?)
    }

    /// Mean next-token cross-entropy on the labelled positions, plus the method's extra term.
    /// The head runs on the labelled positions only (a response is a few of a sequence's
    /// tokens; the head over a 49k vocabulary is the largest product of small models).
    pub fn loss(&self, batch: &CausalBatch) -> Result<Tensor> {
        let hidden = self
            .model
            .forward(&self.inputs(batch)?, self.hooks(), None)?;
        self.loss_of_hidden(batch, &hidden)
    }

    /// The loss from the final hidden states of `batch`.
    fn loss_of_hidden(&self, batch: &CausalBatch, hidden: &Tensor) -> Result<Tensor> {
        let labels = Tensor::from_slice(
            &batch.labels,
            (batch.batch, batch.seq_len),
            self.model.device(),
        )?;
        let (rows, targets) = labelled_rows(&labels, self.model.spec().vocab_size)?;
        let (b, t, h) = hidden.dims3()?;
        let picked = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
        let logits = self.model.lm_head(&picked, self.hooks())?;
        let mut loss = graft_model::loss::cross_entropy(&logits, &targets)?;
        if let Some(extra) = self.adapter.extra_loss()? {
            loss = (loss + extra)?;
        }
        Ok(loss)
    }

    /// [`CausalLm::loss`] and the gradients of the trainable tensors; with `checkpointing`,
    /// each decoder block is recomputed in the backward pass instead of kept (see
    /// [`Decoder::checkpointed_grads`]).
    ///
    /// The gradients are of `loss_scale` times the loss (f16's loss scaling; 1 otherwise);
    /// the loss returned is not scaled.
    pub fn loss_and_grads(
        &self,
        batch: &CausalBatch,
        checkpointing: bool,
        loss_scale: f64,
    ) -> Result<(Tensor, candle_core::backprop::GradStore)> {
        if !checkpointing {
            let loss = self.loss(batch)?;
            let grads = (&loss * loss_scale)?.backward()?;
            return Ok((loss, grads));
        }
        let trainable: Vec<Tensor> = self
            .trainable()
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        let loss_of = |hidden: &Tensor| {
            let loss = self
                .loss_of_hidden(batch, hidden)
                .map_err(|e| graft_model::Error::InvalidConfig(e.to_string()))?;
            Ok((loss * loss_scale)?)
        };
        let dropout = if self.merged {
            None
        } else {
            self.adapter.dropout()
        };
        let (scaled, grads) = self.model.checkpointed_grads(
            &self.inputs(batch)?,
            self.hooks(),
            dropout,
            &trainable,
            &loss_of,
        )?;
        Ok(((scaled / loss_scale)?, grads))
    }

    /// For each prompt (rendered with the template), the index of the label whose token the
    /// model finds likeliest next: `label_ids` holds each label word's token. Prompts run in
    /// batches of `batch_size` of similar lengths (shortest first), so that little padding is
    /// computed: on the paper-abstract task's 538 held-out prompts, 84 k tokens instead of 101 k
    /// in file order for 84 k real ones.
    pub fn verbalize(
        &self,
        prompts: &[String],
        label_ids: &[u32],
        batch_size: usize,
    ) -> Result<Vec<usize>> {
        let device = self.model.device();
        let pad = self.tokenizer.pad_id();
        let labels = Tensor::from_slice(label_ids, label_ids.len(), device)?;
        let all: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| encode_prompt(&self.tokenizer, &self.spec.template, p))
            .collect::<std::result::Result<_, _>>()?;
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by_key(|&i| all[i].len());
        let mut out = vec![0; prompts.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let encoded: Vec<&Vec<u32>> = chunk.iter().map(|&i| &all[i]).collect();
            let t = encoded.iter().map(|e| e.len()).max().unwrap_or(0);
            let mut ids = Vec::with_capacity(chunk.len() * t);
            let mut mask = Vec::with_capacity(chunk.len() * t);
            let mut last = Vec::with_capacity(chunk.len());
            for (row, e) in encoded.iter().enumerate() {
                ids.extend(e.iter());
                ids.extend(std::iter::repeat_n(pad, t - e.len()));
                mask.extend(std::iter::repeat_n(1u32, e.len()));
                mask.extend(std::iter::repeat_n(0u32, t - e.len()));
                last.push((row * t + e.len() - 1) as u32);
            }
            let b = chunk.len();
            let inputs = DecoderInputs {
                input_ids: Tensor::from_vec(ids, (b, t), device)?,
                attention_mask: Some(Tensor::from_vec(mask, (b, t), device)?),
            };
            let hidden =
                graft_model::ops::without_grad(|| self.model.forward(&inputs, self.hooks(), None))?;
            let h = hidden.dim(2)?;
            let rows = Tensor::from_vec(last, b, device)?;
            let at_end = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
            let scores = self
                .model
                .lm_head(&at_end, self.hooks())?
                .index_select(&labels, 1)?;
            for (&prompt, label) in chunk.iter().zip(scores.argmax(1)?.to_vec1::<u32>()?) {
                out[prompt] = label as usize;
            }
        }
        Ok(out)
    }

    /// The answer to `prompt` (rendered with the task's chat template), up to `max_new_tokens`
    /// tokens; `on_text` receives the text as it grows.
    pub fn generate(
        &self,
        prompt: &str,
        max_new_tokens: usize,
        sampling: &Sampling,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
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
            let config = adapter_config(
                &self.peft_type,
                &self.spec.model,
                serde_json::json!({ "task_type": "CAUSAL_LM" }),
                self.adapter.as_ref(),
            );
            adapter::save(dir, &config, &self.adapter.tensors()?)?;
        }
        crate::config::write_task_file(dir, LM_TASK_FILE, &self.spec.with_absolute_paths()?)
    }

    /// A Hugging Face model folder of the model as it runs now (full fine-tuning's tensors, or
    /// a merged adapter), with its tokenizer.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save(dir, self.hooks())?;
        copy_tokenizer(&self.spec.tokenizer, dir)
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

/// A causal-LM training run's configuration (TOML; see `configs/lm/knowledge-adalora.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LmConfig {
    pub model: LmModelSection,
    pub data: LmDataSection,
    /// The optimiser settings of classification runs; `max_steps` counts steps, `epochs` is
    /// unused (a run of `max_steps` cycles through the pairs), and `checkpoint_every` writes the
    /// adapter to the output folder (not the optimizer state: there is no `--resume` yet).
    pub train: crate::config::TrainSection,
    /// `name` picks the plugin; every other key is the method's own (PEFT's field names).
    pub method: toml::Table,
    pub eval: LmEvalSection,
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
    /// The base weights' and activations' dtype: `f32`, `bf16` or `f16`.
    pub dtype: crate::config::Precision,
    /// Keep the frozen projection weights quantized: `q8_0` or `q4_k` (QLoRA-style); the
    /// embeddings, norms and activations stay in `dtype`.
    pub quantize: Option<Quantization>,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping
    /// them (gradient checkpointing): memory for one layer's activations instead of all.
    pub checkpointing: bool,
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
            dtype: crate::config::Precision::F32,
            quantize: None,
            checkpointing: false,
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
    /// CSV only: share of each class (by `eval.label_column`) held out for validation.
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

/// Training pairs and the held-out prompts with their class ids, each with the index of the
/// data row it came from (0-based, the header apart), so that a run's batches and its held-out
/// rows can be named (`cargo xtask bench --reference --model` feeds them to the reference).
pub struct LmData {
    pub train: Vec<graft_tokenizer::PromptResponse>,
    pub train_rows: Vec<usize>,
    pub validation: Vec<(String, usize)>,
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
        if path.extension().is_none_or(|x| x != "csv") {
            // Required columns come first: each record's fields are prompt, response, others.
            let rows = crate::data::Dataset::read_jsonl(&path, &["prompt", "response"])?;
            let (train_rows, train) = rows
                .records
                .into_iter()
                .enumerate()
                .filter(|(i, _)| trained(i))
                .map(|(i, record)| {
                    let mut fields = record.fields.into_iter();
                    let pair = graft_tokenizer::PromptResponse {
                        prompt: clip(fields.next().unwrap_or_default()),
                        response: fields.next().unwrap_or_default(),
                    };
                    (i, pair)
                })
                .unzip();
            return Ok(Self {
                train,
                train_rows,
                validation: Vec::new(),
                validation_rows: Vec::new(),
            });
        }
        let template = |t: &Option<String>, field: &str| {
            t.as_deref()
                .ok_or_else(|| Error::Config(format!("data.{field} is required for a CSV")))
                .and_then(|t| Ok(graft_tokenizer::Template::parse(t)?))
        };
        let rows = crate::data::Dataset::read_csv(&path, &[])?;
        let prompts: Vec<String> = rows
            .texts(&template(&data.prompt, "prompt")?)?
            .into_iter()
            .map(clip)
            .collect();
        let responses = rows.texts(&template(&data.response, "response")?)?;
        let pair = |i: usize| graft_tokenizer::PromptResponse {
            prompt: prompts[i].clone(),
            response: responses[i].clone(),
        };
        // The rows training may see; the split below picks positions in this list.
        let kept: Vec<usize> = (0..prompts.len()).filter(trained).collect();
        if data.val_fraction == 0.0 {
            return Ok(Self {
                train: kept.iter().map(|&i| pair(i)).collect(),
                train_rows: kept,
                validation: Vec::new(),
                validation_rows: Vec::new(),
            });
        }
        let labels = graft_tokenizer::LabelSet::new(config.eval.labels.clone())?;
        let all_classes = rows.labels(&config.eval.label_column, &labels)?;
        let classes: Vec<usize> = kept.iter().map(|&i| all_classes[i]).collect();
        let (train, val) = crate::data::stratified_split(
            &classes,
            labels.len(),
            data.val_fraction,
            config.train.seed,
        )?;
        Ok(Self {
            train: train.iter().map(|&k| pair(kept[k])).collect(),
            train_rows: train.iter().map(|&k| kept[k]).collect(),
            validation: val
                .iter()
                .map(|&k| (prompts[kept[k]].clone(), classes[k]))
                .collect(),
            validation_rows: val.iter().map(|&k| kept[k]).collect(),
        })
    }
}

/// Verbalizer classification of `validation` with the label words `labels`.
pub fn evaluate_verbalizer(
    lm: &CausalLm,
    validation: &[(String, usize)],
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
    let prompts: Vec<String> = validation.iter().map(|(p, _)| p.clone()).collect();
    let truth: Vec<usize> = validation.iter().map(|(_, c)| *c).collect();
    let predicted = lm.verbalize(&prompts, &ids, batch_size)?;
    Ok(crate::metrics::evaluate(
        &truth,
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

/// What a step of [`train_lm`] reports.
#[derive(Debug, Clone)]
pub struct LmStep {
    pub step: usize,
    pub loss: f64,
    /// The step's forward, backward and update, tokenization excluded (as the classifier
    /// trainer times its steps).
    pub seconds: f64,
    pub tokenize_seconds: f64,
    /// Tokens as computed: batch x padded length.
    pub tokens: usize,
    /// The batch: positions in the training pairs.
    pub pairs: Vec<usize>,
}

/// Trains `lm` on `pairs` for `train.max_steps` AdamW steps (batches cycle through the pairs),
/// with warm-up and schedule, gradient clipping and the method's after-step hook; returns the
/// losses. `on_step` sees every step; `checkpointing` recomputes each block in the backward
/// pass. With `save_to`, the adapter is written there every
/// `train.checkpoint_every` steps (atomically), so a crash loses at most that many steps.
pub fn train_lm(
    lm: &mut CausalLm,
    pairs: &[graft_tokenizer::PromptResponse],
    train: &crate::config::TrainSection,
    checkpointing: bool,
    save_to: Option<&Path>,
    on_step: &mut dyn FnMut(&LmStep),
) -> Result<Vec<f64>> {
    use crate::optim::{global_norm, lr_factor, scale_grads, AdamW, LossScaler, ParamGroup};
    use rand::seq::SliceRandom;
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
    let mut scaler = (lm.spec.dtype == crate::config::Precision::F16).then(LossScaler::default);
    // Each pass over the pairs in a fresh seeded order: files are often sorted by label.
    let mut rng = graft_model::init::seeded_rng(train.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut next = 0;
    for step in 0..steps {
        let tokenize_started = std::time::Instant::now();
        let mut batch = Vec::with_capacity(train.batch_size);
        let mut positions = Vec::with_capacity(train.batch_size);
        while batch.len() < train.batch_size {
            if next == order.len() {
                order = (0..pairs.len()).collect();
                order.shuffle(&mut rng);
                next = 0;
            }
            batch.push(pairs[order[next]].clone());
            positions.push(order[next]);
            next += 1;
        }
        let encoded = graft_tokenizer::encode_causal(
            &lm.tokenizer,
            &lm.spec.template,
            &batch,
            lm.spec.max_len,
        )?;
        let tokenize_seconds = tokenize_started.elapsed().as_secs_f64();
        let started = std::time::Instant::now();
        let loss_scale = scaler.as_ref().map_or(1.0, LossScaler::scale);
        let (loss, mut grads) = lm.loss_and_grads(&encoded, checkpointing, loss_scale)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Config(format!(
                "the loss is {value} at step {}",
                step + 1
            )));
        }
        // An f16 step whose scaled gradients overflowed updates nothing (the scale halves).
        let update = match scaler.as_mut() {
            Some(scaler) => scaler.unscale(&mut grads, &vars)?,
            None => true,
        };
        if update {
            if train.max_grad_norm > 0.0 {
                let norm = global_norm(&grads, &vars)?;
                if norm > train.max_grad_norm {
                    scale_grads(&mut grads, &vars, train.max_grad_norm / norm)?;
                }
            }
            optimizer.step(&grads, lr_factor(train.schedule, step, steps, warmup))?;
            lm.adapter.after_step(step + 1, &grads)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        losses.push(value);
        if let Some(dir) = save_to {
            if train.checkpoint_every > 0 && (step + 1) % train.checkpoint_every == 0 {
                lm.adapter.set_training(false);
                lm.save(dir)?;
                lm.adapter.set_training(true);
            }
        }
        on_step(&LmStep {
            step: step + 1,
            loss: value,
            seconds,
            tokenize_seconds,
            tokens: encoded.batch * encoded.seq_len,
            pairs: positions,
        });
    }
    lm.adapter.set_training(false);
    Ok(losses)
}

/// A generated answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The new text, without the stop token.
    pub text: String,
    /// Whether it ended with the template's stop token; false when the token cap cut it.
    pub stopped: bool,
    /// The prompt's tokens, template included.
    pub prompt_tokens: usize,
    /// The tokens generated, the stop token included.
    pub new_tokens: usize,
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
) -> Result<Answer> {
    let ids = encode_prompt(tokenizer, template, prompt)?;
    let stop = template.stop_token_ids(tokenizer)?;
    let mut shown = 0;
    let mut tokens = Vec::new();
    let mut error = None;
    let new_tokens = graft_model::ops::without_grad(|| {
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
        )
    })?;
    if let Some(e) = error {
        return Err(e.into());
    }
    Ok(Answer {
        text: tokenizer.decode(&tokens)?,
        stopped: new_tokens.last().is_some_and(|t| stop.contains(t)),
        prompt_tokens: ids.len(),
        new_tokens: new_tokens.len(),
    })
}
