//! AdaLoRA's configuration, with PEFT's field names and defaults (`AdaLoraConfig`).
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AdaLoraConfig {
    /// Rank every site starts with (the budget is `init_r` per site).
    #[serde(default = "default_init_r")]
    pub init_r: usize,
    /// Average rank per site once the budget has shrunk.
    #[serde(default = "default_target_r")]
    pub target_r: usize,
    /// Steps of warm-up before any pruning.
    #[serde(default)]
    pub tinit: usize,
    /// Steps at the end trained with the final rank pattern.
    #[serde(default)]
    pub tfinal: usize,
    /// Steps between two budget allocations.
    #[serde(default = "default_delta_t", rename = "deltaT")]
    pub delta_t: usize,
    /// Smoothing of the sensitivity.
    #[serde(default = "default_beta")]
    pub beta1: f64,
    /// Smoothing of the uncertainty.
    #[serde(default = "default_beta")]
    pub beta2: f64,
    /// Weight of the orthogonality regulariser on P (B) and Q (A).
    #[serde(default = "default_orth_reg_weight")]
    pub orth_reg_weight: f64,
    /// Optimizer steps of the run; the schedule's length (graft: the run's steps when unset).
    #[serde(default)]
    pub total_step: Option<usize>,
    /// lora_alpha (the update is multiplied by `lora_alpha / (init_r + 1e-5)`, not alpha / r),
    /// lora_dropout and target_modules.
    #[serde(flatten)]
    pub low_rank: config::LowRankFields,
    /// Written by training: per `{site}.lora_E`, which rank indices were kept.
    #[serde(default)]
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
    /// PEFT's many other fields: refused when training; when loading PEFT's files, refused
    /// unless off or at a value graft reads as PEFT does.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_init_r() -> usize {
    12
}
fn default_target_r() -> usize {
    8
}
fn default_delta_t() -> usize {
    1
}
fn default_beta() -> f64 {
    0.85
}
fn default_orth_reg_weight() -> f64 {
    0.5
}

impl AdaLoraConfig {
    /// From a training config: unknown keys are an error, and so is a schedule PEFT refuses.
    pub fn from_train_config(value: &Value) -> Result<Self> {
        let config = Self::parse(value)?;
        if config.other.contains_key("r") {
            return Err(invalid(
                "AdaLoRA does not take `r`: the starting rank is `init_r`".into(),
            ));
        }
        config::refuse_unknown(
            "adalora",
            &config.other,
            &[],
            "init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, \
             total_step, lora_alpha, lora_dropout, target_modules",
        )?;
        if config.rank_pattern.is_some() {
            return Err(invalid(
                "rank_pattern is written by training, not set by a training config".into(),
            ));
        }
        if config.target_r > config.init_r {
            return Err(invalid(format!(
                "target_r ({}) must not exceed init_r ({})",
                config.target_r, config.init_r
            )));
        }
        // PEFT raises in forward for a non-positive weight.
        if !(config.orth_reg_weight.is_finite() && config.orth_reg_weight > 0.0) {
            return Err(invalid(format!(
                "orth_reg_weight must be positive, found {}",
                config.orth_reg_weight
            )));
        }
        Ok(config)
    }

    /// From PEFT's adapter_config.json: a field graft does not implement is refused by name.
    pub fn from_adapter_config(value: &Value) -> Result<Self> {
        let config = Self::parse(value)?;
        // PEFT's AdaLoraConfig inherits LoRA's `r`, which AdaLoRA never reads (init_r).
        let mut inert = config::lora_family_inert();
        inert.push(("r", Value::Null));
        config::refuse_unimplemented("adalora", &config.other, &inert)?;
        Ok(config)
    }

    fn parse(value: &Value) -> Result<Self> {
        let config: Self = config::parse("adalora", value)?;
        if config.init_r == 0 {
            return Err(invalid("init_r must be at least 1, found 0".into()));
        }
        if config.delta_t == 0 {
            return Err(invalid("deltaT must be at least 1, found 0".into()));
        }
        for (name, beta) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(invalid(format!("{name} must be in (0, 1), found {beta}")));
            }
        }
        config.low_rank.check("adalora")?;
        Ok(config)
    }

    /// The schedule's length: `total_step`, else the run's `total_steps` (0: unknown). Checks
    /// what PEFT's `__post_init__` checks: a positive length that leaves a budgeting phase.
    pub fn resolve_total_step(&self, total_steps: usize) -> Result<usize> {
        let total = match self.total_step {
            Some(t) => t,
            None if total_steps > 0 => total_steps,
            None => {
                return Err(invalid(
                    "total_step is unset and the run's step count is unknown".into(),
                ))
            }
        };
        if total == 0 || self.tinit + self.tfinal >= total {
            return Err(invalid(format!(
                "the schedule leaves no budgeting phase: need tinit ({}) < total_step ({total}) \
                 - tfinal ({})",
                self.tinit, self.tfinal
            )));
        }
        Ok(total)
    }

    /// The factor applied to `B·(A⊙E)`: `lora_alpha / (ranknum + 1e-5)` with `ranknum` PEFT's
    /// constant `init_r` (kept after pruning).
    pub fn scale(&self) -> f64 {
        self.low_rank.lora_alpha / (self.init_r as f64 + 1e-5)
    }

    /// The fields PEFT writes for AdaLoRA in adapter_config.json (`total_step` as the schedule
    /// ran; PEFT refuses a config without one).
    pub fn to_json(&self, total_step: Option<usize>, rank_pattern: Option<Value>) -> Value {
        self.low_rank.to_json(serde_json::json!({
            "r": 8,
            "init_r": self.init_r,
            "target_r": self.target_r,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.delta_t,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": total_step,
            "rank_pattern": rank_pattern,
        }))
    }
}

pub(crate) fn invalid(reason: String) -> Error {
    config::invalid("adalora", reason)
}
