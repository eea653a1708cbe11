//! Sequence classifiers, as transformers' `*ForSequenceClassification`: BERT with its pooler
//! and `classifier`, or a decoder read at each sequence's last real token with `score` (no
//! bias); and, with [`Pooling::Tokens`], token classifiers as its `*ForTokenClassification`
//! (the same heads on every token, the decoder's with a bias). What the trainer's
//! classification tasks drive, whatever the architecture.
use crate::decoder::{Decoder, DecoderInputs};
use crate::error::{Error, Result};
use crate::hooks::{Hooks, ModelInfo, SiteInfo};
use crate::init;
use crate::layers::{ClassifierHead, Linear, LinearSites};
use crate::load::read_plan;
use crate::models::bert::{BertForSequenceClassification, Inputs, Pooling};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// A model that maps a batch to class logits `[batch, num_labels]` (with [`Pooling::Tokens`],
/// `[batch, tokens, num_labels]`).
pub trait SequenceClassifier: LinearSites + Send + Sync {
    fn info(&self) -> ModelInfo;
    fn sites(&self) -> Vec<SiteInfo>;
    /// Every base tensor under its checkpoint key.
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
    fn head(&self) -> &ClassifierHead;
    /// The head's module name in transformers' class: `classifier` (BERT), `score` (decoders).
    fn head_name(&self) -> &'static str;
    fn forward(&self, inputs: &Inputs, hooks: &dyn Hooks) -> Result<Tensor>;
    /// Writes a complete model folder (config.json, model.safetensors with the head), every
    /// base tensor as `hooks` resolve it.
    fn save(&self, dir: &Path, num_labels: usize, hooks: &dyn Hooks) -> Result<()>;
    /// The BERT encoder, for BERT classifiers (tests reach into its layout).
    fn bert(&self) -> Option<&crate::models::bert::Bert> {
        None
    }
}

impl LinearSites for BertForSequenceClassification {
    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        self.bert.linear_mut(name)
    }
}

impl SequenceClassifier for BertForSequenceClassification {
    fn info(&self) -> ModelInfo {
        self.bert.info()
    }
    fn sites(&self) -> Vec<SiteInfo> {
        self.bert.sites()
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.bert.named_tensors()
    }
    fn head(&self) -> &ClassifierHead {
        &self.head
    }
    fn head_name(&self) -> &'static str {
        "classifier"
    }
    fn forward(&self, inputs: &Inputs, hooks: &dyn Hooks) -> Result<Tensor> {
        BertForSequenceClassification::forward(self, inputs, hooks)
    }
    fn save(&self, dir: &Path, num_labels: usize, hooks: &dyn Hooks) -> Result<()> {
        BertForSequenceClassification::save(self, dir, num_labels, hooks)
    }
    fn bert(&self) -> Option<&crate::models::bert::Bert> {
        Some(&self.bert)
    }
}

/// transformers' LlamaForSequenceClassification (and Qwen2's, Mistral's, ChatGLM's): the
/// final hidden state of each sequence's last real token through `score`, `[labels, hidden]`
/// without bias; with [`Pooling::Tokens`], LlamaForTokenClassification's: every token's final
/// hidden state through `score` with a bias.
pub struct DecoderForSequenceClassification {
    pub decoder: Decoder,
    pub head: ClassifierHead,
    /// [`Pooling::Tokens`] labels every token; any other, the last real one.
    pub pooling: Pooling,
}

impl LinearSites for DecoderForSequenceClassification {
    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        self.decoder.linear_mut(name)
    }
}

impl SequenceClassifier for DecoderForSequenceClassification {
    fn info(&self) -> ModelInfo {
        self.decoder.info()
    }
    fn sites(&self) -> Vec<SiteInfo> {
        self.decoder.sites()
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.decoder.named_tensors()
    }
    fn head(&self) -> &ClassifierHead {
        &self.head
    }
    fn head_name(&self) -> &'static str {
        "score"
    }

    fn forward(&self, inputs: &Inputs, hooks: &dyn Hooks) -> Result<Tensor> {
        let (b, t) = inputs.input_ids.dims2()?;
        let hidden = self.decoder.forward(
            &DecoderInputs {
                input_ids: inputs.input_ids.clone(),
                attention_mask: Some(inputs.attention_mask.clone()),
            },
            hooks,
            None,
        )?;
        if self.pooling == Pooling::Tokens {
            return self.head.forward(&hidden);
        }
        // Right padding: the last real token of row i is at (real tokens - 1).
        let lengths: Vec<u32> = inputs
            .attention_mask
            .to_dtype(DType::U32)?
            .sum(1)?
            .to_vec1::<u32>()?;
        let mut rows = Vec::with_capacity(b);
        for (i, &n) in lengths.iter().enumerate() {
            if n == 0 {
                return Err(Error::InvalidConfig(format!(
                    "row {i} of the batch has no real token"
                )));
            }
            rows.push((i * t) as u32 + n - 1);
        }
        let rows = Tensor::from_vec(rows, b, hidden.device())?;
        let h = hidden.dim(2)?;
        let last = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
        self.head.forward(&last)
    }

    fn save(&self, dir: &Path, num_labels: usize, hooks: &dyn Hooks) -> Result<()> {
        let extra = self
            .head
            .vars()
            .into_iter()
            .map(|(name, var)| (format!("score.{name}"), var.as_tensor().detach()))
            .collect();
        let mut json = self.decoder.config_json().clone();
        let family = match self.decoder.spec().model_type.as_str() {
            "qwen2" => "Qwen2",
            "mistral" => "Mistral",
            "chatglm" => "ChatGLM",
            _ => "Llama",
        };
        json["architectures"] = serde_json::json!([self.pooling.architecture(family)]);
        json["num_labels"] = serde_json::json!(num_labels);
        self.decoder.save_with(dir, hooks, extra, &json)
    }
}

/// The model file of `path`: a folder with config.json as it is, a `.gguf` file, or a folder
/// without config.json holding exactly one `.gguf` file (a fetched GGUF model).
pub fn resolve_model_path(path: &Path) -> Result<PathBuf> {
    if path.is_file() || path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let ggufs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(Error::MissingFile {
            path: path.join("config.json"),
            what: "model config (and not exactly one .gguf file)",
        }),
    }
}

/// The sequence classifier of the model at `path` (BERT or a decoder, by config.json's
/// `model_type`; a `.gguf` file is a Llama). A checkpoint written by `graft merge` or full
/// fine-tuning carries its head; otherwise the head starts as transformers' does (normal(0,
/// 0.02) weights, zero bias) from `seed`.
pub fn load(
    path: &Path,
    num_labels: usize,
    pooling: Pooling,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<Box<dyn SequenceClassifier>> {
    let path = resolve_model_path(path)?;
    let is_bert = path.is_dir() && {
        let (model_type, _) = read_model_type(&path.join("config.json"))?;
        model_type == "bert"
    };
    if is_bert {
        return Ok(Box::new(BertForSequenceClassification::load(
            &path, num_labels, pooling, dtype, device, seed,
        )?));
    }
    let (decoder, saved_head) = if path.is_file() {
        (Decoder::open(&path, dtype, device)?, None)
    } else {
        let (plan, json) = read_plan(&path)?;
        let weights = Weights::load_folder(&path, dtype, device, None)?;
        let head = weights
            .find("score.weight")
            .map(|w| (w.clone(), weights.find("score.bias").cloned()));
        (Decoder::from_plan(&plan, &weights, json)?, head)
    };
    let h = decoder.spec().hidden_size;
    let per_token = pooling == Pooling::Tokens;
    let head = match saved_head {
        Some((w, b)) if w.dims() == [num_labels, h] && b.is_some() == per_token => {
            ClassifierHead::new(w, b)?
        }
        _ => ClassifierHead::new(
            init::normal(
                &mut init::seeded_rng(seed),
                &[num_labels, h],
                0.02,
                dtype,
                device,
            )?,
            // transformers' token head has a bias (zero at first), its sequence head none.
            per_token
                .then(|| Tensor::zeros(num_labels, dtype, device))
                .transpose()?,
        )?,
    };
    Ok(Box::new(DecoderForSequenceClassification {
        decoder,
        head,
        pooling,
    }))
}

fn read_model_type(config: &Path) -> Result<(String, serde_json::Value)> {
    let text = std::fs::read_to_string(config).map_err(|source| Error::Io {
        path: config.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Config {
        path: config.to_path_buf(),
        source,
    })?;
    let model_type = json["model_type"].as_str().unwrap_or("bert").to_string();
    Ok((model_type, json))
}
