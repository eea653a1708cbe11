//! A decoder with its method attached, for causal-LM fine-tuning and generation: what
//! `graft train-lm`, `graft generate` and the decoder checks of every method share.
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
    /// Every batch padded to `max_len` (static shapes: a benchmark's exact step size, a GPU's
    /// one graph), instead of to its longest row.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pad_to_max_len: bool,
    /// `model` is a config.json the base is built from with random weights of this seed
    /// (`--random-init`), not a checkpoint; the same seed builds the same base again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_init: Option<u64>,
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

    /// The task of THUDM's P-tuning v2 output `dir` on `base`: its prompt format (`chatglm2`,
    /// as `ptuning/main.py` builds its inputs), the base's tokenizer and longest sequence.
    fn of_thudm(dir: &Path, base: Option<&Path>) -> Result<Self> {
        let (model, max_len) = crate::thudm::base(dir, base)?;
        Ok(Self {
            method: crate::thudm::METHOD.into(),
            tokenizer: Self::default_tokenizer(&model),
            model,
            template: ChatTemplate::ChatGlm2,
            max_len,
            dtype: Default::default(),
            quantize: None,
            prompt: None,
            pad_to_max_len: false,
            random_init: None,
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

/// What a command gives besides an adapter folder, in place of what the folder records (THUDM's
/// P-tuning v2 output records none of it and needs `model`).
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The base model (its tokenizer too, unless `tokenizer` is given).
    pub model: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub template: Option<ChatTemplate>,
    /// The base's dtype, instead of the one it was trained in.
    pub dtype: Option<crate::config::Precision>,
    /// The base's weights dense even where it was trained quantized (they are read
    /// dequantized): what merging the adapter into weights that are written out needs.
    pub dense: bool,
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
    let decoder = match spec.random_init {
        Some(seed) => Decoder::random(model, dtype, spec.quantize, device, seed)?,
        None => Decoder::open_quantized(model, dtype, spec.quantize, device)?,
    };
    let padding = if spec.pad_to_max_len {
        Padding::Fixed
    } else {
        Padding::Longest
    };
    let tokenizer = TextTokenizer::from_file(&spec.tokenizer, spec.max_len, padding)?;
    // Every id the tokenizer can give must have a row in the model's embedding table.
    let (tokens, rows) = (tokenizer.vocab_size(), decoder.spec().vocab_size);
    if tokens > rows {
        return Err(Error::Config(format!(
            "the tokenizer {} has {tokens} tokens, more than the {rows} rows of the model {}'s embedding table",
            spec.tokenizer.display(),
            model.display()
        )));
    }
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
    /// model folder), or from THUDM's P-tuning v2 output (with `options.model`).
    pub fn open(dir: &Path, registry: &Registry, device: &Device) -> Result<Self> {
        Self::open_with(dir, registry, device, &OpenOptions::default())
    }

    /// [`CausalLm::open`], with what `options` gives in place of what the folder records.
    pub fn open_with(
        dir: &Path,
        registry: &Registry,
        device: &Device,
        options: &OpenOptions,
    ) -> Result<Self> {
        let thudm = crate::thudm::is_checkpoint(dir);
        let mut spec = if thudm {
            LmSpec::of_thudm(dir, options.model.as_deref())?
        } else {
            LmSpec::read(dir)?
        };
        if let (false, Some(model)) = (thudm, &options.model) {
            spec.tokenizer = LmSpec::default_tokenizer(model);
            spec.model = model.clone();
        }
        if let Some(tokenizer) = &options.tokenizer {
            spec.tokenizer = tokenizer.clone();
        }
        if let Some(template) = &options.template {
            spec.template = template.clone();
        }
        if let Some(dtype) = options.dtype {
            spec.dtype = dtype;
        }
        if options.dense {
            spec.quantize = None;
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
        let saved = if thudm {
            crate::thudm::read(dir, device)?
        } else {
            read_saved(dir, method, &spec.method, device)?
        };
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
        let (b, t, h) = hidden.dims3()?;
        let (rows, targets) = labelled_rows(
            &batch.labels,
            b * t,
            self.model.spec().vocab_size,
            self.model.device(),
        )?;
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

/// One line on what a quantized base holds: how many projection weights in which block
/// format, their size, and the dense projections left (rows no block divides).
pub fn quantized_summary(family: graft_model::quant::Quantization, model: &Decoder) -> String {
    let quantized = model.quantized();
    let mut formats = std::collections::BTreeMap::new();
    for (_, blocks) in &quantized {
        *formats
            .entry(graft_model::quant::format_name(blocks.format()))
            .or_insert(0usize) += 1;
    }
    let bytes: usize = quantized.iter().map(|(_, b)| b.size_in_bytes()).sum();
    let dense = model.sites().len() - quantized.len();
    format!(
        "base quantized to {family}: {} projection weights ({}), {:.1} MiB; {dense} left in {} (rows no block divides)",
        quantized.len(),
        formats
            .iter()
            .map(|(f, n)| format!("{n} {f}"))
            .collect::<Vec<_>>()
            .join(", "),
        bytes as f64 / (1u64 << 20) as f64,
        model.dtype().as_str()
    )
}
