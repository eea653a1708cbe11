//! P-tuning v2's configuration: PEFT's prefix-tuning fields plus the paper's prefix dropout.
use graft_peft::prompt_learning::PrefixSettings;
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Result};
use serde::Deserialize;

pub(crate) const NAME: &str = "p-tuning-v2";

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PTuningV2Config {
    /// PEFT's prefix fields. The deep-prompt length is task-specific in the paper (short,
    /// about 20, suits sentence classification; sequence labelling wants about 100), and it
    /// finds the MLP reparametrisation task-dependent and leaves it off, as the default is.
    #[serde(flatten)]
    pub prefix: PrefixSettings,
    /// Dropout on the prefixes while training (THUDM's P-tuning v2 uses the model's
    /// hidden_dropout_prob, 0.1 for BERT models). Training only; not saved.
    #[serde(default = "default_dropout")]
    pub prefix_dropout: f64,
    /// Keys it does not take (PEFT's bookkeeping keys pass); refused.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_dropout() -> f64 {
    0.1
}

impl PTuningV2Config {
    /// From a training config: unknown keys are an error.
    pub fn from_train_config(value: &Value) -> Result<Self> {
        let config: Self = config::parse(NAME, value)?;
        config.prefix.check(NAME)?;
        if !(0.0..1.0).contains(&config.prefix_dropout) {
            return Err(config::invalid(
                NAME,
                format!(
                    "prefix_dropout must be in [0, 1), found {}",
                    config.prefix_dropout
                ),
            ));
        }
        let takes = format!("{}, prefix_dropout", PrefixSettings::FIELDS);
        config::refuse_unknown(NAME, &config.other, &[], &takes)?;
        Ok(config)
    }
}
