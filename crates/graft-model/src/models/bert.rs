//! BERT encoder (Devlin et al. 2019) and BertForSequenceClassification, as transformers
//! defines them, with linear sites named like transformers' module paths.
//!
//! Dropout is not applied (the training graph is deterministic for a seed); the frozen base is
//! used as in evaluation mode, which is also how the PEFT fixtures' logits were produced.
use crate::error::{Error, Result};
use crate::hooks::{Acts, Hooks, LinearSite, ModelInfo, SiteInfo};
use crate::init;
use crate::layers::{ClassifierHead, LayerNorm, Linear, Param};
use crate::ops;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a BERT config.json that the forward pass depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Every other field of config.json, kept so that a saved model's config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_model_type() -> String {
    "bert".into()
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(Error::opening(path, "model config"))?;
        let config: Self = serde_json::from_str(&text).map_err(|source| Error::Config {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate().map_err(|e| match e {
            Error::InvalidConfig(reason) => {
                Error::InvalidConfig(format!("{}: {reason}", path.display()))
            }
            other => other,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::InvalidConfig(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.model_type != "bert" {
            return Err(Error::InvalidConfig(format!(
                "model_type `{}` is not an architecture graft knows (bert)",
                self.model_type
            )));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "relu") {
            return Err(Error::InvalidConfig(format!(
                "hidden_act `{}` is not supported (gelu, gelu_new, relu)",
                self.hidden_act
            )));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// A batch of token ids as the model takes it, each `[batch, seq]`.
pub struct Inputs {
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    pub token_type_ids: Option<Tensor>,
}

struct Embeddings {
    word: Param,
    position: Param,
    token_type: Param,
    norm: LayerNorm,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The BERT encoder (`bert.*` in a BertForSequenceClassification checkpoint).
pub struct Bert {
    config: Config,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// `None` in a token classifier, which has none (transformers' `add_pooling_layer=False`).
    pooler: Option<Linear>,
}

/// The prefix every module path of the encoder carries in transformers' task models.
pub const PREFIX: &str = "bert.";

impl Bert {
    /// The encoder from `weights`, with transformers' pooler when `with_pooler`.
    pub fn load(config: Config, weights: &Weights, with_pooler: bool) -> Result<Self> {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let embeddings = Embeddings {
            word: Param::load(
                weights,
                "embeddings.word_embeddings.weight",
                &[config.vocab_size, h],
            )?,
            position: Param::load(
                weights,
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: Param::load(
                weights,
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            norm: LayerNorm::load(weights, "embeddings.LayerNorm", h, eps)?,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let site = |suffix: &str, inp: usize, out: usize| {
                Linear::load(weights, &format!("{p}.{suffix}"), inp, out, true, Some(i))
            };
            layers.push(Layer {
                query: site("attention.self.query", h, h)?,
                key: site("attention.self.key", h, h)?,
                value: site("attention.self.value", h, h)?,
                attention_out: site("attention.output.dense", h, h)?,
                attention_norm: LayerNorm::load(
                    weights,
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    eps,
                )?,
                intermediate: site("intermediate.dense", h, config.intermediate_size)?,
                output: site("output.dense", config.intermediate_size, h)?,
                output_norm: LayerNorm::load(weights, &format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        let pooler = with_pooler
            .then(|| Linear::load(weights, "pooler.dense", h, h, true, None))
            .transpose()?;
        Ok(Self {
            config,
            embeddings,
            layers,
            pooler,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            model_type: self.config.model_type.clone(),
            hidden_size: self.config.hidden_size,
            num_layers: self.config.num_hidden_layers,
            num_heads: self.config.num_attention_heads,
            num_kv_heads: self.config.num_attention_heads,
            head_dim: self.config.head_dim(),
            vocab_size: self.config.vocab_size,
            word_embeddings: self.embeddings.word.key().to_string(),
        }
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.query,
                    &l.key,
                    &l.value,
                    &l.attention_out,
                    &l.intermediate,
                    &l.output,
                ]
            })
            .chain(self.pooler.as_ref())
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.query,
                    &mut l.key,
                    &mut l.value,
                    &mut l.attention_out,
                    &mut l.intermediate,
                    &mut l.output,
                ]
            })
            .chain(self.pooler.as_mut())
    }

    /// Every base tensor under its checkpoint key, in checkpoint order.
    pub fn params(&self) -> Vec<&Param> {
        let e = &self.embeddings;
        let mut params = vec![&e.word, &e.position, &e.token_type];
        params.extend(e.norm.params());
        for l in &self.layers {
            for linear in [&l.query, &l.key, &l.value, &l.attention_out] {
                params.extend(linear.params());
            }
            params.extend(l.attention_norm.params());
            params.extend(l.intermediate.params());
            params.extend(l.output.params());
            params.extend(l.output_norm.params());
        }
        if let Some(pooler) = &self.pooler {
            params.extend(pooler.params());
        }
        params
    }

    /// `(key, tensor)` of every base tensor: what full fine-tuning starts from.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params()
            .into_iter()
            .map(|p| (p.key().to_string(), p.value().clone()))
            .collect()
    }

    pub fn sites(&self) -> Vec<SiteInfo> {
        self.linears().map(Linear::info).collect()
    }

    pub fn linear(&self, name: &str) -> Option<&Linear> {
        self.linears().find(|l| l.name() == name)
    }

    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        self.linears_mut().find(|l| l.name() == name)
    }

    /// Hidden states `[batch, prompt + seq, hidden]` and the widened 0/1 mask over them.
    pub fn forward(&self, inputs: &Inputs, hooks: &dyn Hooks) -> Result<(Tensor, Tensor)> {
        self.encode(inputs, hooks, false)
    }

    /// As [`Bert::forward`], but the last layer computes only the first position (`[batch, 1,
    /// hidden]`), all that the pooler reads: its keys and values still come from every
    /// position, so the result is the same, for about a seventh fewer FLOPs in MiniLM.
    pub fn forward_first(&self, inputs: &Inputs, hooks: &dyn Hooks) -> Result<Tensor> {
        Ok(self.encode(inputs, hooks, true)?.0)
    }

    fn encode(
        &self,
        inputs: &Inputs,
        hooks: &dyn Hooks,
        first_only: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (b, s) = inputs.input_ids.dims2()?;
        let word_table = self.embeddings.word.resolve(hooks)?;
        let dtype = word_table.dtype();
        let device = word_table.device();
        let prefix_len = hooks.kv_prefix_len();

        let word = word_table
            .index_select(&inputs.input_ids.flatten_all()?, 0)?
            .reshape((b, s, ()))?;
        let token_types = match &inputs.token_type_ids {
            Some(t) => t.clone(),
            None => Tensor::zeros((b, s), DType::U32, device)?,
        };
        let mask = inputs.attention_mask.to_dtype(DType::F32)?;
        // Prompt tuning: virtual tokens go ahead of the word embeddings, before positions and
        // token types are added; their token type is 0 and the mask is widened with ones.
        let (word, token_types, mask) = match hooks.prompt(b)? {
            Some(prompt) => {
                let n = prompt.dim(1)?;
                (
                    Tensor::cat(&[&prompt.to_dtype(dtype)?, &word], 1)?,
                    Tensor::cat(
                        &[&Tensor::zeros((b, n), DType::U32, device)?, &token_types],
                        1,
                    )?,
                    Tensor::cat(&[&Tensor::ones((b, n), DType::F32, device)?, &mask], 1)?,
                )
            }
            None => (word, token_types, mask),
        };
        let t = word.dim(1)?;
        // Key/value prefixes act as past positions: the real tokens' positions start after them.
        let first = prefix_len;
        if first + t > self.config.max_position_embeddings {
            return Err(Error::InvalidConfig(format!(
                "sequence of {t} tokens (plus {first} prefix positions) exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let position = self
            .embeddings
            .position
            .resolve(hooks)?
            .narrow(0, first, t)?;
        let token_type = self
            .embeddings
            .token_type
            .resolve(hooks)?
            .index_select(&token_types.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let embedded = word.broadcast_add(&position)?.add(&token_type)?;
        let mut hidden = self.embeddings.norm.forward(&embedded, hooks)?;

        let key_mask = if prefix_len > 0 {
            Tensor::cat(
                &[&Tensor::ones((b, prefix_len), DType::F32, device)?, &mask],
                1,
            )?
        } else {
            mask.clone()
        };
        let bias = ops::additive_mask(&key_mask, dtype)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let queries = if first_only && i == last { 1 } else { t };
            hidden = self.layer_forward(i, layer, &hidden, queries, &bias, hooks)?;
        }
        Ok((hidden, mask))
    }

    /// Query, key and value as one product `[b, t, 3 · hidden]` (one larger matrix product,
    /// one graph node and one gradient for the layer input), with the methods' low-rank
    /// updates of their columns; `None` where a method may act on them otherwise, or their
    /// weights are trained (then each site runs on its own).
    fn packed_qkv(&self, layer: &Layer, x: &Tensor, hooks: &dyn Hooks) -> Result<Option<Tensor>> {
        let sites = [&layer.query, &layer.key, &layer.value];
        let mut parts = Vec::with_capacity(3);
        for site in sites {
            let acts = hooks.acts_on(site.name());
            let (weight, bias) = site.resolved(hooks)?;
            let Some(bias) = bias else { return Ok(None) };
            if acts == Acts::Any || weight.track_op() || bias.track_op() {
                return Ok(None);
            }
            parts.push((site, acts, weight, bias));
        }
        let mut updates = Vec::new();
        let mut column = 0;
        for (site, acts, weight, bias) in &parts {
            let out = weight.dim(0)?;
            if *acts == Acts::LowRankOnly {
                let linear = LinearSite {
                    name: site.name(),
                    out_features: out,
                    in_features: weight.dim(1)?,
                    weight: Some(weight),
                    bias: Some(bias),
                };
                if let Some(update) = hooks.low_rank(&linear, x)? {
                    updates.push((column..column + out, update));
                }
            }
            column += out;
        }
        let weight = Tensor::cat(&parts.iter().map(|p| &p.2).collect::<Vec<_>>(), 0)?;
        let bias = Tensor::cat(&parts.iter().map(|p| &p.3).collect::<Vec<_>>(), 0)?;
        let updates: Vec<_> = updates.iter().map(|(c, u)| (c.clone(), u)).collect();
        Ok(Some(ops::linear_low_ranks(
            x,
            &weight,
            Some(&bias),
            &updates,
        )?))
    }

    fn layer_forward(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        queries: usize,
        bias: &Tensor,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        // Keys and values from every position; queries (and all that follows) from the first
        // `queries` positions.
        let every_position = queries == x.dim(1)?;
        let x_out = if every_position {
            x.clone()
        } else {
            x.narrow(1, 0, queries)?
        };
        let heads = self.config.num_attention_heads;
        let spec = ops::AttentionSpec {
            heads,
            kv_heads: heads,
            causal: false,
            key_bias: Some(bias),
        };
        let prefix = hooks.kv_prefix(index, b)?;
        let packed = match (&prefix, every_position) {
            (None, true) => self.packed_qkv(layer, x, hooks)?,
            _ => None,
        };
        let context = match packed {
            Some(qkv) => ops::attention_packed(&qkv, &spec)?,
            None => {
                let q = layer.query.forward(&x_out, hooks)?;
                let mut k = layer.key.forward(x, hooks)?;
                let mut v = layer.value.forward(x, hooks)?;
                if let Some((pk, pv)) = prefix {
                    // Prefixes come as [b, prefix, heads, head_dim]; the activations are [b,
                    // t, hidden].
                    let dtype = k.dtype();
                    let flat = |p: Tensor| -> Result<Tensor> {
                        let (pb, pt, ph, pd) = p.dims4()?;
                        Ok(p.to_dtype(dtype)?.reshape((pb, pt, ph * pd))?)
                    };
                    k = Tensor::cat(&[&flat(pk)?, &k], 1)?;
                    v = Tensor::cat(&[&flat(pv)?, &v], 1)?;
                }
                ops::attention(&q, &k, &v, &spec)?
            }
        };
        let x = if hooks.acts_on(layer.attention_out.name()) != Acts::Not {
            let attended = layer.attention_out.forward(&context, hooks)?;
            layer.attention_norm.forward(&(attended + x_out)?, hooks)?
        } else {
            // One node (fused when its tensors are frozen), as the feed-forward block below.
            let out = residual_norm(&layer.attention_out, &layer.attention_norm, hooks)?;
            ops::projection_norm(&context, &x_out, &out)?
        };
        if self.config.hidden_act == "gelu"
            && hooks.acts_on(layer.intermediate.name()) == Acts::Not
            && hooks.acts_on(layer.output.name()) == Acts::Not
        {
            // No method acts on the block's sites: one node (fused when its tensors are frozen).
            let (w_in, b_in) = layer.intermediate.resolved(hooks)?;
            let out = residual_norm(&layer.output, &layer.output_norm, hooks)?;
            let block = ops::FeedForward { w_in, b_in, out };
            return Ok(ops::feed_forward_block(&x, &block)?);
        }
        let inner = layer.intermediate.forward(&x, hooks)?;
        let inner = match self.config.hidden_act.as_str() {
            "gelu" => ops::gelu_erf(&inner)?,
            "gelu_new" => inner.gelu()?,
            _ => inner.relu()?,
        };
        let out = layer.output.forward(&inner, hooks)?;
        layer.output_norm.forward(&(out + x)?, hooks)
    }

    /// transformers' BertPooler: dense + tanh on the first position.
    pub fn pool_first(&self, hidden: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        let pooler = self.pooler.as_ref().ok_or_else(|| {
            Error::InvalidConfig("this BERT was loaded without its pooler".into())
        })?;
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(pooler.forward(&first, hooks)?.tanh()?)
    }
}

/// The tensors of `linear` followed by a residual add and `norm`, as `hooks` resolve them.
fn residual_norm(
    linear: &Linear,
    norm: &LayerNorm,
    hooks: &dyn Hooks,
) -> Result<ops::ResidualNorm> {
    let (weight, bias) = linear.resolved(hooks)?;
    let (gamma, beta) = norm.resolved(hooks)?;
    Ok(ops::ResidualNorm {
        weight,
        bias,
        gamma,
        beta,
        eps: norm.eps(),
    })
}

/// How a sequence is reduced to the vector the classifier reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// BERT's pooler (dense + tanh on the first token), as BertForSequenceClassification.
    #[default]
    Pooler,
    /// The mean over real tokens, as sentence-transformers' all-MiniLM-L6-v2.
    Mean,
    /// None: the head labels every token (transformers' `*ForTokenClassification`), logits
    /// `[batch, tokens, labels]` over the input's tokens (a prompt's virtual tokens get none).
    Tokens,
}

impl Pooling {
    /// transformers' class for a classifier pooled this way: `{family}ForSequenceClassification`
    /// or `{family}ForTokenClassification`.
    pub fn architecture(self, family: &str) -> String {
        match self {
            Self::Tokens => format!("{family}ForTokenClassification"),
            Self::Pooler | Self::Mean => format!("{family}ForSequenceClassification"),
        }
    }
}

/// mean over positions where `mask` is 1: `[b, t, h]`, `[b, t]` -> `[b, h]`.
pub fn masked_mean(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    Ok(summed.broadcast_div(&counts)?)
}

/// transformers' BertForSequenceClassification: encoder, pooling, linear classifier; with
/// [`Pooling::Tokens`], its BertForTokenClassification (the same `classifier` on every token).
pub struct BertForSequenceClassification {
    pub bert: Bert,
    pub pooling: Pooling,
    pub head: ClassifierHead,
}

impl BertForSequenceClassification {
    /// Loads a model folder (config.json + its weights, as [`Weights::load_folder`] finds them); the head is initialised like
    /// transformers' (normal(0, 0.02) weights, zero bias) from `seed`.
    pub fn load(
        dir: &Path,
        num_labels: usize,
        pooling: Pooling,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let weights = Weights::load_folder(dir, dtype, device, None)?.with_prefix(PREFIX);
        // transformers' BertForTokenClassification has no pooler: nothing would train it.
        let bert = Bert::load(config, &weights, pooling != Pooling::Tokens)?;
        let h = bert.config.hidden_size;
        // A checkpoint of a sequence classifier (e.g. written by `graft merge`) carries its head.
        let head = match (
            weights.find("classifier.weight"),
            weights.find("classifier.bias"),
        ) {
            (Some(w), Some(b)) if w.dims() == [num_labels, h] => {
                ClassifierHead::new(w.clone(), Some(b.clone()))?
            }
            _ => {
                let mut rng = init::seeded_rng(seed);
                ClassifierHead::new(
                    init::normal(&mut rng, &[num_labels, h], 0.02, dtype, device)?,
                    Some(Tensor::zeros(num_labels, dtype, device)?),
                )?
            }
        };
        Ok(Self {
            bert,
            pooling,
            head,
        })
    }

    /// Logits `[batch, num_labels]`; with [`Pooling::Tokens`], `[batch, tokens, num_labels]`.
    pub fn forward(&self, inputs: &Inputs, hooks: &dyn Hooks) -> Result<Tensor> {
        let pooled = match self.pooling {
            Pooling::Pooler => self
                .bert
                .pool_first(&self.bert.forward_first(inputs, hooks)?, hooks)?,
            Pooling::Mean => {
                let (hidden, mask) = self.bert.forward(inputs, hooks)?;
                masked_mean(&hidden, &mask)?
            }
            Pooling::Tokens => {
                let (hidden, _) = self.bert.forward(inputs, hooks)?;
                // A prompt's virtual tokens stand first: only the input's tokens are labelled.
                let (s, t) = (inputs.input_ids.dim(1)?, hidden.dim(1)?);
                hidden.narrow(1, t - s, s)?
            }
        };
        self.head.forward(&pooled)
    }

    /// Writes a complete BertForSequenceClassification checkpoint (config.json +
    /// model.safetensors, `bert.`-prefixed names plus `classifier.*`), every base tensor as
    /// `hooks` resolves it (full fine-tuning's trained tensors, or the frozen base).
    pub fn save(&self, dir: &Path, num_labels: usize, hooks: &dyn Hooks) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let c = &self.bert.config;
        let mut tensors = Vec::new();
        for param in self.bert.params() {
            tensors.push((param.key().to_string(), param.resolve(hooks)?.detach()));
        }
        for (name, var) in self.head.vars() {
            tensors.push((format!("classifier.{name}"), var.as_tensor().detach()));
        }
        crate::formats::safetensors::save_safetensors(&dir.join("model.safetensors"), &tensors)?;
        let mut json = serde_json::to_value(c).map_err(|source| Error::Config {
            path: dir.join("config.json"),
            source,
        })?;
        json["architectures"] = serde_json::json!([self.pooling.architecture("Bert")]);
        json["num_labels"] = serde_json::json!(num_labels);
        crate::formats::safetensors::save_json(&json, &dir.join("config.json"))
    }
}

/// The last dimension's argmax, used by evaluation.
pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

impl crate::layers::LinearSites for Bert {
    fn linear_mut(&mut self, name: &str) -> Option<&mut crate::layers::Linear> {
        Bert::linear_mut(self, name)
    }
}
