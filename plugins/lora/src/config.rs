//! LoRA's configuration, with PEFT's field names and defaults.
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Error, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update B·A.
    #[serde(default = "default_r")]
    pub r: usize,
    /// lora_alpha (the update is multiplied by alpha / r, alpha / sqrt(r) with rsLoRA),
    /// lora_dropout and target_modules.
    #[serde(flatten)]
    pub low_rank: config::LowRankFields,
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
        config.low_rank.check("lora")?;
        Ok(config)
    }

    /// The factor applied to B·A.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.low_rank.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.low_rank.lora_alpha / self.r as f64
        }
    }

    /// The fields PEFT writes for LoRA in adapter_config.json.
    pub fn to_json(&self) -> Value {
        self.low_rank.to_json(serde_json::json!({
            "r": self.r,
            "use_rslora": self.use_rslora,
            "rank_pattern": {},
            "alpha_pattern": {},
        }))
    }
}

fn invalid(reason: String) -> Error {
    config::invalid("lora", reason)
}
