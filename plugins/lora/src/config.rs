//! LoRA's configuration, with PEFT's field names and defaults.
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Error, Result, TargetModules};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update B·A.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which linear sites get an update.
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Rank-stabilised scaling (Kalajdzievski 2023).
    #[serde(default)]
    pub use_rslora: bool,
    /// PEFT's many other fields: refused when training; when loading PEFT's files, refused
    /// unless off or at a value graft reads as PEFT does.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
/// PEFT's BERT default; [`graft_peft::config::with_default_targets`] fills in other
/// architectures' before parsing.
fn default_targets() -> TargetModules {
    TargetModules::Names(vec!["query".into(), "value".into()])
}

impl LoraConfig {
    /// From a training config: unknown keys are an error.
    pub fn from_train_config(value: &Value) -> Result<Self> {
        let config = Self::parse(value)?;
        config::refuse_unknown(
            "lora",
            &config.other,
            &[],
            "r, lora_alpha, lora_dropout, target_modules, use_rslora",
        )?;
        Ok(config)
    }

    /// From PEFT's adapter_config.json: a field graft does not implement is refused by name.
    pub fn from_adapter_config(value: &Value) -> Result<Self> {
        let config = Self::parse(value)?;
        config::refuse_unimplemented("lora", &config.other, &config::lora_family_inert())?;
        Ok(config)
    }

    fn parse(value: &Value) -> Result<Self> {
        let config: Self = config::parse("lora", value)?;
        if config.r == 0 {
            return Err(invalid("r must be at least 1, found 0".into()));
        }
        if !(config.lora_alpha.is_finite() && config.lora_alpha > 0.0) {
            return Err(invalid(format!(
                "lora_alpha must be positive, found {}",
                config.lora_alpha
            )));
        }
        if !(0.0..1.0).contains(&config.lora_dropout) {
            return Err(invalid(format!(
                "lora_dropout must be in [0, 1), found {}",
                config.lora_dropout
            )));
        }
        Ok(config)
    }

    /// The factor applied to B·A.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// The fields PEFT writes for LoRA in adapter_config.json.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules.to_json(),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "init_lora_weights": true,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }
}

fn invalid(reason: String) -> Error {
    config::invalid("lora", reason)
}
