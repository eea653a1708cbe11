//! What Hugging Face PEFT's prompt-learning methods share: the virtual-token fields of
//! `PromptLearningConfig`, and the prefix encoder whose table holds every layer's key/value
//! prefixes (`prompt_embeddings` `[n, layers * 2 * kv_dim]` in the saved file).
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use graft_model::init::{self, SeededRng};
use graft_model::ModelInfo;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The saved tensor of every prompt-learning method.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// The prefix table as THUDM's ChatGLM P-tuning v2 scripts save it: the same
/// `[pre_seq_len, layers * 2 * kv_dim]` layout (keys, then values, per layer).
pub const THUDM_PREFIX: &str = "transformer.prefix_encoder.embedding.weight";

/// PEFT's virtual-token fields, which it fills from the model's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VirtualTokens {
    pub num_virtual_tokens: usize,
    /// Hidden size of the model.
    pub token_dim: usize,
    /// 1 for encoder-only and decoder-only models.
    pub num_transformer_submodules: usize,
    pub num_attention_heads: usize,
    pub num_layers: usize,
}

impl VirtualTokens {
    /// The fields PEFT fills from the model's config; graft takes them from the model, so a
    /// training config may carry them without their being the method's own settings.
    pub const MODEL_FIELDS: &'static [&'static str] = &[
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
    ];

    pub fn for_model(method: &str, num_virtual_tokens: usize, info: &ModelInfo) -> Result<Self> {
        if num_virtual_tokens == 0 {
            return Err(Error::Config {
                method: method.into(),
                reason: "num_virtual_tokens must be at least 1, found 0".into(),
            });
        }
        Ok(Self {
            num_virtual_tokens,
            token_dim: info.hidden_size,
            num_transformer_submodules: 1,
            num_attention_heads: info.num_heads,
            num_layers: info.num_layers,
        })
    }

    /// From a saved adapter_config.json, checked against the model it is loaded into.
    pub fn from_saved(method: &str, config: &Value, info: &ModelInfo) -> Result<Self> {
        if let Some(fields) = config.as_object() {
            crate::config::refuse_unimplemented(method, fields, &Self::saved_fields())?;
        }
        // THUDM's ChatGLM configs call it `pre_seq_len`.
        let n = config["num_virtual_tokens"]
            .as_u64()
            .or_else(|| config["pre_seq_len"].as_u64())
            .ok_or_else(|| Error::Config {
                method: method.into(),
                reason: "`num_virtual_tokens` (or THUDM's `pre_seq_len`) is missing".into(),
            })? as usize;
        let tokens = Self::for_model(method, n, info)?;
        for (field, want) in [
            ("token_dim", tokens.token_dim),
            ("num_layers", tokens.num_layers),
        ] {
            if let Some(found) = config[field].as_u64() {
                if found as usize != want {
                    return Err(Error::Config {
                        method: method.into(),
                        reason: format!(
                            "`{field}` is {found} but the model has {want}: the adapter was made for another model"
                        ),
                    });
                }
            }
        }
        Ok(tokens)
    }

    /// The fields of a saved prompt-learning config graft reads (checked here or by the
    /// method), or that only shape initialisation and training (the saved table is what
    /// PEFT loads in inference mode, any projection folded in). One transformer submodule:
    /// graft has no encoder-decoder models.
    fn saved_fields() -> Vec<(&'static str, Value)> {
        let any = [
            "num_virtual_tokens",
            "pre_seq_len",
            "token_dim",
            "num_layers",
            "num_attention_heads",
            "encoder_hidden_size",
            "prefix_projection",
            "prompt_tuning_init",
            "prompt_tuning_init_text",
            "tokenizer_name_or_path",
            "tokenizer_kwargs",
        ];
        let mut fields: Vec<(&'static str, Value)> =
            any.iter().map(|k| (*k, Value::Null)).collect();
        fields.push(("num_transformer_submodules", Value::from(1)));
        fields
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The fields of PEFT's `PrefixTuningConfig`, which prefix tuning and P-tuning v2 both take;
/// each method's config holds them (`#[serde(flatten)]`) beside its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PrefixSettings {
    /// Prefix positions added to every layer's keys and values.
    #[serde(default = "default_prefix_tokens")]
    pub num_virtual_tokens: usize,
    /// Train the prefixes through an MLP (Li and Liang's reparametrisation); saving folds it in.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden width of that MLP (default: the model's hidden size, as PEFT fills it).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
}

fn default_prefix_tokens() -> usize {
    20
}

impl PrefixSettings {
    /// The fields, for a "`method` takes ..." message.
    pub const FIELDS: &'static str = "num_virtual_tokens, prefix_projection, encoder_hidden_size";

    /// Refuses counts of zero, as errors of `method`'s config.
    pub fn check(&self, method: &str) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return Err(crate::config::invalid(
                method,
                "num_virtual_tokens must be at least 1, found 0",
            ));
        }
        if self.encoder_hidden_size == Some(0) {
            return Err(crate::config::invalid(
                method,
                "encoder_hidden_size must be at least 1",
            ));
        }
        Ok(())
    }

    /// A fresh adapter of `method` with these settings and `dropout` on the prefixes while
    /// training.
    pub fn adapter(
        &self,
        method: &str,
        dropout: f64,
        ctx: &crate::AttachContext,
    ) -> Result<PrefixAdapter> {
        let hidden = self
            .prefix_projection
            .then(|| self.encoder_hidden_size.unwrap_or(ctx.info.hidden_size));
        PrefixAdapter::create(method, self.num_virtual_tokens, hidden, dropout, ctx)
    }
}

/// A prefix method's config: PEFT's prefix fields, dropout on the prefixes while training
/// (graft's, from P-tuning v2; not saved), and the keys it does not take.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PrefixConfig {
    #[serde(flatten)]
    pub prefix: PrefixSettings,
    /// Unset: the method's default.
    #[serde(default)]
    pub prefix_dropout: Option<f64>,
    /// PEFT's other fields: refused when training, unless the method lets them pass.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// What tells the prefix methods (prefix tuning, P-tuning v2) apart: name, defaults, and the
/// keys a training config may carry. Their plugins implement [`PrefixPlugin`] with one.
pub struct PrefixMethod {
    pub name: &'static str,
    /// `None`: the method takes no `prefix_dropout` (PEFT's prefix tuning has none).
    pub default_dropout: Option<f64>,
    /// Keys a training config may hold besides the method's (model fields PEFT fills in).
    pub passes: &'static [&'static str],
}

impl PrefixMethod {
    /// A method without prefix dropout, passing `passes`.
    pub const fn without_dropout(name: &'static str, passes: &'static [&'static str]) -> Self {
        Self {
            name,
            default_dropout: None,
            passes,
        }
    }

    /// A method with prefix dropout, `default` when unset.
    pub const fn with_dropout(name: &'static str, default: f64) -> Self {
        Self {
            name,
            default_dropout: Some(default),
            passes: &[],
        }
    }

    /// From a training config: unknown keys refused, counts and dropout checked.
    pub fn train_config(&self, value: &Value) -> Result<PrefixConfig> {
        let mut config = self.adapter_config(value)?;
        let takes = match self.default_dropout {
            Some(default) => {
                let dropout = *config.prefix_dropout.get_or_insert(default);
                if !(0.0..1.0).contains(&dropout) {
                    return Err(crate::config::invalid(
                        self.name,
                        format!("prefix_dropout must be in [0, 1), found {dropout}"),
                    ));
                }
                format!("{}, prefix_dropout", PrefixSettings::FIELDS)
            }
            None => {
                // Not a key of this method: refused below as any unknown key is.
                if let Some(dropout) = config.prefix_dropout.take() {
                    config.other.insert("prefix_dropout".into(), dropout.into());
                }
                PrefixSettings::FIELDS.to_string()
            }
        };
        crate::config::refuse_unknown(self.name, &config.other, self.passes, &takes)?;
        Ok(config)
    }

    /// From a saved adapter_config.json: unknown keys ignored (PEFT writes many).
    pub fn adapter_config(&self, value: &Value) -> Result<PrefixConfig> {
        let config: PrefixConfig = crate::config::parse(self.name, value)?;
        config.prefix.check(self.name)?;
        Ok(config)
    }
}

/// A prefix method's plugin: [`PrefixPlugin::METHOD`] says which, and the adapter is graft-peft's
/// shared [`PrefixAdapter`].
pub trait PrefixPlugin: Send + Sync {
    const METHOD: PrefixMethod;
    /// See [`crate::Method::recommended_config`].
    const RECOMMENDED_CONFIG: Option<&'static str> = None;
}

impl<T: PrefixPlugin> crate::PluginMethod for T {
    fn recommended_config(&self) -> Option<&'static str> {
        T::RECOMMENDED_CONFIG
    }

    fn create(
        &self,
        config: &Value,
        ctx: &crate::AttachContext,
    ) -> Result<Box<dyn crate::Adapter>> {
        let config = T::METHOD.train_config(config)?;
        let dropout = config.prefix_dropout.unwrap_or(0.0);
        Ok(Box::new(config.prefix.adapter(
            T::METHOD.name,
            dropout,
            ctx,
        )?))
    }

    fn load(
        &self,
        saved: &crate::Saved,
        ctx: &crate::AttachContext,
    ) -> Result<Box<dyn crate::Adapter>> {
        T::METHOD.adapter_config(saved.config)?;
        Ok(Box::new(PrefixAdapter::load(T::METHOD.name, saved, ctx)?))
    }
}

/// PEFT's reparametrisation of prefix tuning: Linear(token_dim, hidden), tanh,
/// Linear(hidden, layers * 2 * kv_dim), over a `[n, token_dim]` embedding.
pub struct PrefixProjection {
    pub embedding: Var,
    pub w1: Var,
    pub b1: Var,
    pub w2: Var,
    pub b2: Var,
}

/// Key/value prefixes for every layer, trained directly (a `[n, layers * 2 * kv_dim]` table) or
/// through a [`PrefixProjection`] that saving folds into the table.
pub struct PrefixEncoder {
    table: Option<Var>,
    /// The key the table is saved under: PEFT's, or THUDM's when read from their layout.
    table_key: &'static str,
    projection: Option<PrefixProjection>,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn linear_init(
    rng: &mut SeededRng,
    out: usize,
    inp: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Var, Var)> {
    // torch nn.Linear's default initialisation.
    let bound = init::kaiming_uniform_bound(inp);
    Ok((
        Var::from_tensor(&init::uniform(rng, &[out, inp], bound, dtype, device)?)?,
        Var::from_tensor(&init::uniform(rng, &[out], bound, dtype, device)?)?,
    ))
}

impl PrefixEncoder {
    /// Width of a table row: every layer's key and value.
    pub fn width(info: &ModelInfo) -> usize {
        info.num_layers * 2 * info.num_kv_heads * info.head_dim
    }

    /// A fresh encoder: the table (or the projection's embedding) ~ normal(0, 1), like
    /// torch's nn.Embedding; with `projection_hidden`, the MLP of PEFT's prefix_projection.
    pub fn new(
        rng: &mut SeededRng,
        num_virtual_tokens: usize,
        info: &ModelInfo,
        projection_hidden: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let width = Self::width(info);
        let (table, projection) = match projection_hidden {
            None => (
                Some(Var::from_tensor(&init::normal(
                    rng,
                    &[num_virtual_tokens, width],
                    1.0,
                    dtype,
                    device,
                )?)?),
                None,
            ),
            Some(hidden) => {
                let embedding = Var::from_tensor(&init::normal(
                    rng,
                    &[num_virtual_tokens, info.hidden_size],
                    1.0,
                    dtype,
                    device,
                )?)?;
                let (w1, b1) = linear_init(rng, hidden, info.hidden_size, dtype, device)?;
                let (w2, b2) = linear_init(rng, width, hidden, dtype, device)?;
                (
                    None,
                    Some(PrefixProjection {
                        embedding,
                        w1,
                        b1,
                        w2,
                        b2,
                    }),
                )
            }
        };
        Ok(Self {
            table,
            table_key: PROMPT_EMBEDDINGS,
            projection,
            layers: info.num_layers,
            kv_heads: info.num_kv_heads,
            head_dim: info.head_dim,
        })
    }

    /// An encoder over a saved table `[n, layers * 2 * kv_dim]`, saved again under `key`.
    pub fn from_table(table: &Tensor, info: &ModelInfo, key: &'static str) -> Result<Self> {
        Ok(Self {
            table: Some(Var::from_tensor(table)?),
            table_key: key,
            projection: None,
            layers: info.num_layers,
            kv_heads: info.num_kv_heads,
            head_dim: info.head_dim,
        })
    }

    /// The prefix table `[n, layers * 2 * kv_dim]` (through the projection if there is one).
    pub fn table(&self) -> candle_core::Result<Tensor> {
        match (&self.table, &self.projection) {
            (Some(table), _) => Ok(table.as_tensor().clone()),
            (None, Some(p)) => {
                let hidden = graft_model::ops::linear(
                    p.embedding.as_tensor(),
                    p.w1.as_tensor(),
                    Some(p.b1.as_tensor()),
                )?
                .tanh()?;
                graft_model::ops::linear(&hidden, p.w2.as_tensor(), Some(p.b2.as_tensor()))
            }
            (None, None) => candle_core::bail!("prefix encoder without a table"),
        }
    }

    /// Key and value prefixes of `layer` from `table`, each `[batch, n, kv_heads, head_dim]`,
    /// in PEFT's layout: row block `2 * layer` holds the keys, `2 * layer + 1` the values.
    pub fn layer_prefix(
        &self,
        table: &Tensor,
        layer: usize,
        batch: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = table.dim(0)?;
        let blocks = table.reshape((n, self.layers * 2, self.kv_heads, self.head_dim))?;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            blocks
                .narrow(1, i, 1)?
                .squeeze(1)?
                .unsqueeze(0)?
                .broadcast_as((batch, n, self.kv_heads, self.head_dim))
        };
        Ok((part(2 * layer)?, part(2 * layer + 1)?))
    }

    /// Trainable tensors under PEFT's training-time names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        match (&self.table, &self.projection) {
            (Some(table), _) => vec![(self.table_key.to_string(), table.clone())],
            (None, Some(p)) => vec![
                (
                    "prompt_encoder.embedding.weight".into(),
                    p.embedding.clone(),
                ),
                ("prompt_encoder.transform.0.weight".into(), p.w1.clone()),
                ("prompt_encoder.transform.0.bias".into(), p.b1.clone()),
                ("prompt_encoder.transform.2.weight".into(), p.w2.clone()),
                ("prompt_encoder.transform.2.bias".into(), p.b2.clone()),
            ],
            (None, None) => Vec::new(),
        }
    }

    /// What PEFT saves: the table alone, the projection folded in.
    pub fn saved(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(self.table_key.to_string(), self.table()?.detach())])
    }
}

/// PEFT's prefix-tuning fields of adapter_config.json. The saved table has any projection
/// folded in, so `prefix_projection` is false (PEFT's loader would otherwise expect the MLP).
fn saved_config(tokens: &VirtualTokens, encoder_hidden_size: usize) -> Value {
    crate::config::merge_json(
        tokens.to_json(),
        serde_json::json!({
            "prefix_projection": false,
            "encoder_hidden_size": encoder_hidden_size,
        }),
    )
}

/// The adapter of prefix tuning and P-tuning v2: every layer's attention sees trainable
/// key/value prefixes, optionally with dropout on them while training (P-tuning v2).
pub struct PrefixAdapter {
    encoder: PrefixEncoder,
    num_virtual_tokens: usize,
    /// The method's fields of adapter_config.json.
    config: Value,
    dropout: init::Dropout,
}

impl PrefixAdapter {
    /// A fresh adapter of `num_virtual_tokens` prefix positions, trained through an MLP of
    /// width `projection_hidden` if given, with `dropout` on the prefixes while training.
    pub fn create(
        method: &str,
        num_virtual_tokens: usize,
        projection_hidden: Option<usize>,
        dropout: f64,
        ctx: &crate::AttachContext,
    ) -> Result<Self> {
        let tokens = VirtualTokens::for_model(method, num_virtual_tokens, ctx.info)?;
        let encoder = PrefixEncoder::new(
            &mut init::seeded_rng(ctx.seed),
            num_virtual_tokens,
            ctx.info,
            projection_hidden,
            ctx.dtype,
            ctx.device,
        )?;
        let hidden = projection_hidden.unwrap_or(tokens.token_dim);
        Self::new(encoder, saved_config(&tokens, hidden), dropout, ctx.seed)
    }

    /// An adapter from PEFT's prefix-tuning files (`prompt_embeddings`, no projection), or
    /// from THUDM's P-tuning v2 layout ([`THUDM_PREFIX`], `pre_seq_len`).
    pub fn load(method: &str, saved: &crate::Saved, ctx: &crate::AttachContext) -> Result<Self> {
        let (config, tensors) = (saved.config, saved.tensors);
        let tokens = VirtualTokens::from_saved(method, config, ctx.info)?;
        let key = if !tensors.contains_key(PROMPT_EMBEDDINGS) && tensors.contains_key(THUDM_PREFIX)
        {
            THUDM_PREFIX
        } else {
            PROMPT_EMBEDDINGS
        };
        let table = saved.tensor(
            key,
            &[tokens.num_virtual_tokens, PrefixEncoder::width(ctx.info)],
        )?;
        let encoder = PrefixEncoder::from_table(&table.to_dtype(ctx.dtype)?, ctx.info, key)?;
        let hidden = config["encoder_hidden_size"]
            .as_u64()
            .map_or(tokens.token_dim, |h| h as usize);
        Self::new(encoder, saved_config(&tokens, hidden), 0.0, ctx.seed)
    }

    fn new(encoder: PrefixEncoder, config: Value, dropout: f64, seed: u64) -> Result<Self> {
        let num_virtual_tokens = encoder.table()?.dim(0)?;
        Ok(Self {
            encoder,
            num_virtual_tokens,
            config,
            dropout: init::Dropout::new(dropout, seed ^ 0x9e37_79b9),
        })
    }
}

impl graft_model::Hooks for PrefixAdapter {
    /// Acts through key/value prefixes only: every linear site may run fused.
    fn acts_on(&self, _site: &str) -> graft_model::Acts {
        graft_model::Acts::Not
    }

    fn kv_prefix_len(&self) -> usize {
        self.num_virtual_tokens
    }

    fn kv_prefix(
        &self,
        layer: usize,
        batch: usize,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let table = self.dropout.apply(&self.encoder.table()?)?;
        self.encoder.layer_prefix(&table, layer, batch).map(Some)
    }
}

impl crate::Adapter for PrefixAdapter {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.encoder.vars()
    }

    fn dropout(&self) -> Option<&init::Dropout> {
        Some(&self.dropout)
    }

    fn config_json(&self) -> Value {
        self.config.clone()
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.encoder.saved()
    }
}
