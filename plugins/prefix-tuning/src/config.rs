//! Prefix tuning's configuration, with PEFT's field names and defaults.
use graft_peft::prompt_learning::{PrefixSettings, VirtualTokens};
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Result};
use serde::Deserialize;

pub(crate) const NAME: &str = "prefix-tuning";

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PrefixTuningConfig {
    /// PEFT's prefix fields (graft-peft holds them: P-tuning v2 takes them too).
    #[serde(flatten)]
    pub prefix: PrefixSettings,
    /// PEFT's other fields: refused when training; when loading PEFT's files, refused unless
    /// off or read (`VirtualTokens::from_saved`).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl PrefixTuningConfig {
    /// From a training config: unknown keys are an error.
    pub fn from_train_config(value: &Value) -> Result<Self> {
        let config = Self::parse(value)?;
        config::refuse_unknown(
            NAME,
            &config.other,
            VirtualTokens::MODEL_FIELDS,
            PrefixSettings::FIELDS,
        )?;
        Ok(config)
    }

    /// From PEFT's adapter_config.json (a saved table never has a projection left).
    pub fn from_adapter_config(value: &Value) -> Result<Self> {
        Self::parse(value)
    }

    fn parse(value: &Value) -> Result<Self> {
        let config: Self = config::parse(NAME, value)?;
        config.prefix.check(NAME)?;
        Ok(config)
    }
}
