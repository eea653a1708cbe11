//! Prefix tuning's configuration, with PEFT's field names and defaults.
use graft_peft::prompt_learning::VirtualTokens;
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Error, Result};

const NAME: &str = "prefix-tuning";
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PrefixTuningConfig {
    /// Prefix positions added to every layer's keys and values.
    #[serde(default = "default_tokens")]
    pub num_virtual_tokens: usize,
    /// Train the prefixes through an MLP (Li and Liang's reparametrisation); saving folds it in.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden width of that MLP (default: the model's hidden size, as PEFT fills it).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// PEFT's other fields: refused when training; when loading PEFT's files, refused unless
    /// off or read (`VirtualTokens::from_saved`).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_tokens() -> usize {
    20
}

impl PrefixTuningConfig {
    /// From a training config: unknown keys are an error.
    pub fn from_train_config(value: &Value) -> Result<Self> {
        let config = Self::parse(value)?;
        config::refuse_unknown(
            NAME,
            &config.other,
            VirtualTokens::MODEL_FIELDS,
            "num_virtual_tokens, prefix_projection, encoder_hidden_size",
        )?;
        Ok(config)
    }

    /// From PEFT's adapter_config.json (a saved table never has a projection left).
    pub fn from_adapter_config(value: &Value) -> Result<Self> {
        Self::parse(value)
    }

    fn parse(value: &Value) -> Result<Self> {
        let config: Self = config::parse(NAME, value)?;
        if config.num_virtual_tokens == 0 {
            return Err(invalid(
                "num_virtual_tokens must be at least 1, found 0".into(),
            ));
        }
        if config.encoder_hidden_size == Some(0) {
            return Err(invalid("encoder_hidden_size must be at least 1".into()));
        }
        Ok(config)
    }
}

fn invalid(reason: String) -> Error {
    config::invalid("prefix-tuning", reason)
}
