//! P-tuning's configuration (PEFT's `PromptEncoderConfig`), with PEFT's field names and
//! defaults.
use graft_peft::graft_model::ModelInfo;
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Error, Result};
use serde::Deserialize;

/// How the virtual tokens are reparameterised (PEFT's `PromptEncoderReparameterizationType`).
/// PEFT compares the exact strings, so `"mlp"` is refused as PEFT's encoder refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum EncoderType {
    /// Linear -> ReLU -> Linear -> ReLU -> Linear.
    Mlp,
    /// Bidirectional multi-layer LSTM, then Linear -> ReLU -> Linear.
    Lstm,
}

impl TryFrom<String> for EncoderType {
    type Error = String;

    fn try_from(value: String) -> std::result::Result<Self, String> {
        match value.as_str() {
            "MLP" => Ok(EncoderType::Mlp),
            "LSTM" => Ok(EncoderType::Lstm),
            other => Err(format!(
                "encoder_reparameterization_type must be \"MLP\" or \"LSTM\", found {other:?}"
            )),
        }
    }
}

impl EncoderType {
    pub fn as_str(self) -> &'static str {
        match self {
            EncoderType::Mlp => "MLP",
            EncoderType::Lstm => "LSTM",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PTuningConfig {
    /// Number of virtual tokens placed ahead of the input.
    #[serde(default = "default_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// Width of a virtual token: the model's hidden size (filled from the model when unset).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for encoder-only and decoder-only models (PEFT uses 2 only for seq2seq).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// The model's attention heads (filled from the model; informational for P-tuning).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// The model's transformer blocks (filled from the model; informational for P-tuning).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// `"MLP"` or `"LSTM"`.
    #[serde(default = "default_encoder_type")]
    pub encoder_reparameterization_type: EncoderType,
    /// Hidden width of the prompt encoder; `token_dim` when unset (as PEFT fills it).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers (the MLP always has PEFT's fixed three linear layers).
    #[serde(default = "default_encoder_layers")]
    pub encoder_num_layers: usize,
    /// Dropout between LSTM layers while training.
    #[serde(default)]
    pub encoder_dropout: f64,
    /// PEFT's other fields: refused when training; when loading PEFT's files, refused unless
    /// off.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_virtual_tokens() -> usize {
    20
}
fn default_encoder_type() -> EncoderType {
    EncoderType::Mlp
}
fn default_encoder_layers() -> usize {
    2
}

impl PTuningConfig {
    /// From a training config: unknown keys are an error; the model-dependent fields are
    /// filled from `info` (and must agree with it when given).
    pub fn from_train_config(value: &Value, info: &ModelInfo) -> Result<Self> {
        let mut config = Self::parse(value)?;
        config::refuse_unknown(
            "p-tuning",
            &config.other,
            &[],
            "num_virtual_tokens, encoder_reparameterization_type, encoder_hidden_size, \
             encoder_num_layers, encoder_dropout (and token_dim, num_transformer_submodules, \
             num_attention_heads, num_layers, which default to the model's)",
        )?;
        config.other.clear();
        config.resolve(info)?;
        Ok(config)
    }

    /// From PEFT's adapter_config.json: a field graft does not implement is refused by name.
    pub fn from_adapter_config(value: &Value, info: &ModelInfo) -> Result<Self> {
        let mut config = Self::parse(value)?;
        config::refuse_unimplemented("p-tuning", &config.other, &[])?;
        config.other.clear();
        config.resolve(info)?;
        Ok(config)
    }

    fn parse(value: &Value) -> Result<Self> {
        let config: Self = config::parse("p-tuning", value)?;
        if config.num_virtual_tokens == 0 {
            return Err(invalid(
                "num_virtual_tokens must be at least 1, found 0".into(),
            ));
        }
        if config.encoder_hidden_size == Some(0) {
            return Err(invalid(
                "encoder_hidden_size must be at least 1, found 0".into(),
            ));
        }
        if config.encoder_num_layers == 0 {
            return Err(invalid(
                "encoder_num_layers must be at least 1, found 0".into(),
            ));
        }
        if !(0.0..1.0).contains(&config.encoder_dropout) {
            return Err(invalid(format!(
                "encoder_dropout must be in [0, 1), found {}",
                config.encoder_dropout
            )));
        }
        Ok(config)
    }

    /// Fills the model-dependent fields as PEFT does, refusing values for another model.
    fn resolve(&mut self, info: &ModelInfo) -> Result<()> {
        for (field, slot, model) in [
            ("token_dim", &mut self.token_dim, info.hidden_size),
            (
                "num_attention_heads",
                &mut self.num_attention_heads,
                info.num_heads,
            ),
            ("num_layers", &mut self.num_layers, info.num_layers),
            (
                "num_transformer_submodules",
                &mut self.num_transformer_submodules,
                1,
            ),
        ] {
            match *slot {
                None => *slot = Some(model),
                Some(given) if given != model => {
                    return Err(invalid(format!(
                        "{field} is {given}, but this model needs {model}"
                    )))
                }
                Some(_) => {}
            }
        }
        if self.encoder_hidden_size.is_none() {
            self.encoder_hidden_size = self.token_dim;
        }
        Ok(())
    }

    /// Width of a virtual token (the model's hidden size).
    pub fn token_dim(&self) -> usize {
        self.token_dim.unwrap_or_default()
    }

    /// Hidden width of the prompt encoder.
    pub fn encoder_hidden_size(&self) -> usize {
        self.encoder_hidden_size.unwrap_or_else(|| self.token_dim())
    }

    /// Rows of the prompt table: virtual tokens times transformer submodules (always 1 here).
    pub fn total_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens * self.num_transformer_submodules.unwrap_or(1)
    }

    /// The fields PEFT writes for P-tuning in adapter_config.json.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.token_dim,
            "num_transformer_submodules": self.num_transformer_submodules,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "encoder_reparameterization_type": self.encoder_reparameterization_type.as_str(),
            "encoder_hidden_size": self.encoder_hidden_size(),
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        })
    }
}

fn invalid(reason: String) -> Error {
    config::invalid("p-tuning", reason)
}

#[cfg(test)]
mod p_tuning_tests {
    use super::*;
    use serde_json::json;

    fn minilm() -> ModelInfo {
        ModelInfo {
            model_type: "bert".into(),
            hidden_size: 384,
            num_layers: 6,
            num_heads: 12,
            num_kv_heads: 12,
            head_dim: 32,
            vocab_size: 30522,
            word_embeddings: "embeddings.word_embeddings.weight".into(),
        }
    }

    #[test]
    fn defaults_are_peft_s_with_model_fields_filled() {
        let config = PTuningConfig::from_train_config(&json!({}), &minilm()).unwrap();
        assert_eq!(
            config.to_json(),
            json!({
                "num_virtual_tokens": 20,
                "token_dim": 384,
                "num_transformer_submodules": 1,
                "num_attention_heads": 12,
                "num_layers": 6,
                "encoder_reparameterization_type": "MLP",
                "encoder_hidden_size": 384,
                "encoder_num_layers": 2,
                "encoder_dropout": 0.0,
            })
        );
    }

    #[test]
    fn saved_config_reads_back_and_ignores_peft_s_other_keys() {
        let config = PTuningConfig::from_train_config(
            &json!({ "num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM",
                     "encoder_hidden_size": 8, "encoder_dropout": 0.1 }),
            &minilm(),
        )
        .unwrap();
        let mut saved = config.to_json();
        saved["peft_type"] = json!("P_TUNING");
        saved["inference_mode"] = json!(true);
        saved["modules_to_save"] = json!(["classifier", "score", "classifier", "score"]);
        let again = PTuningConfig::from_adapter_config(&saved, &minilm()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn config_errors_name_the_field() {
        let info = minilm();
        let err = |v: Value| {
            PTuningConfig::from_train_config(&v, &info)
                .unwrap_err()
                .to_string()
        };
        assert!(err(json!({ "num_virtual_tokens": 0 })).contains("num_virtual_tokens"));
        assert!(err(json!({ "virtual_tokens": 4 })).contains("virtual_tokens"));
        assert!(err(json!({ "token_dim": 768 })).contains("token_dim is 768"));
        assert!(err(json!({ "encoder_dropout": 1.0 })).contains("encoder_dropout"));
        assert!(err(json!({ "encoder_reparameterization_type": "lstm" }))
            .contains("encoder_reparameterization_type"));
    }
}
