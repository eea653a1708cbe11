//! P-tuning v2's configuration: PEFT's prefix-tuning fields plus the paper's prefix dropout.
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Error, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PTuningV2Config {
    /// Deep-prompt length per layer; task-specific in the paper (short, about 20, suits
    /// sentence classification; sequence labelling wants about 100).
    #[serde(default = "default_tokens")]
    pub num_virtual_tokens: usize,
    /// The paper finds the MLP reparametrisation task-dependent and leaves it off by default.
    #[serde(default)]
    pub prefix_projection: bool,
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Dropout on the prefixes while training (THUDM's P-tuning v2 uses the model's
    /// hidden_dropout_prob, 0.1 for BERT models). Training only; not saved.
    #[serde(default = "default_dropout")]
    pub prefix_dropout: f64,
    /// Written by graft's own config files; informational.
    #[serde(default)]
    pub peft_type: Option<String>,
}

fn default_tokens() -> usize {
    20
}
fn default_dropout() -> f64 {
    0.1
}

impl PTuningV2Config {
    /// From a training config: unknown keys are an error.
    pub fn from_train_config(value: &Value) -> Result<Self> {
        let mut fields: Map<String, Value> = value.as_object().cloned().unwrap_or_default();
        fields.retain(|k, _| !matches!(k.as_str(), "task_type" | "base_model_name_or_path"));
        let config: Self = serde_json::from_value(Value::Object(fields)).map_err(|e| {
            invalid(format!(
                "{e}; P-tuning v2 takes num_virtual_tokens, prefix_projection, encoder_hidden_size, prefix_dropout"
            ))
        })?;
        if config.num_virtual_tokens == 0 {
            return Err(invalid(
                "num_virtual_tokens must be at least 1, found 0".into(),
            ));
        }
        if !(0.0..1.0).contains(&config.prefix_dropout) {
            return Err(invalid(format!(
                "prefix_dropout must be in [0, 1), found {}",
                config.prefix_dropout
            )));
        }
        Ok(config)
    }
}

fn invalid(reason: String) -> Error {
    config::invalid("p-tuning-v2", reason)
}
