//! IA3's configuration, with PEFT's field names and defaults.
use graft_peft::serde_json::{json, Map, Value};
use graft_peft::{config, Error, Result, TargetModules};
use serde::Deserialize;

const NAME: &str = "ia3";

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Ia3Config {
    /// Sites whose activations are rescaled (PEFT's BERT default: key, value, output.dense).
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// The subset of targets rescaled on their input instead of their output.
    #[serde(default = "default_feedforward")]
    pub feedforward_modules: TargetModules,
    /// Start from ones (the base model unchanged), as PEFT does; false starts at random.
    #[serde(default = "default_true")]
    pub init_ia3_weights: bool,
    /// PEFT's other fields: refused when training; when loading PEFT's files, refused unless
    /// off.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_targets() -> TargetModules {
    TargetModules::Names(vec!["key".into(), "value".into(), "output.dense".into()])
}
fn default_feedforward() -> TargetModules {
    TargetModules::Names(vec!["output.dense".into()])
}
fn default_true() -> bool {
    true
}

impl Ia3Config {
    /// From a training config: unknown keys are an error.
    pub fn from_train_config(value: &Value) -> Result<Self> {
        let config: Self = config::parse(NAME, value)?;
        config::refuse_unknown(
            NAME,
            &config.other,
            &[],
            "target_modules, feedforward_modules, init_ia3_weights",
        )?;
        Ok(config)
    }

    /// From PEFT's adapter_config.json: a field graft does not implement is refused by name.
    pub fn from_adapter_config(value: &Value) -> Result<Self> {
        let config: Self = config::parse(NAME, value)?;
        config::refuse_unimplemented(NAME, &config.other, &[])?;
        Ok(config)
    }

    /// The fields PEFT writes for IA3 in adapter_config.json.
    pub fn to_json(&self) -> Value {
        json!({
            "target_modules": self.target_modules.to_json(),
            "feedforward_modules": self.feedforward_modules.to_json(),
            "init_ia3_weights": self.init_ia3_weights,
            "fan_in_fan_out": false,
        })
    }
}

/// The error of a site that is a feed-forward module but not a target.
pub fn feedforward_not_targeted(site: &str) -> Error {
    config::invalid(
        NAME,
        format!("feedforward_modules selects `{site}`, which target_modules does not; feedforward_modules must be a subset"),
    )
}
