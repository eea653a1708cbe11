//! What every method's config does the same way: read PEFT's JSON fields, and refuse keys a
//! training config should not hold.
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Keys PEFT writes in every adapter_config.json; methods read them as informational only.
pub const PEFT_BOOKKEEPING: &[&str] = &["peft_type", "task_type", "base_model_name_or_path"];

/// The error of `method`'s config.
pub fn invalid(method: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        method: method.into(),
        reason: reason.into(),
    }
}

/// `method`'s config from JSON (a training config's `[method]` table or adapter_config.json).
pub fn parse<T: DeserializeOwned>(method: &str, value: &Value) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| invalid(method, e.to_string()))
}

/// Refuses the keys of a training config that `method` does not take. `other` holds the
/// fields its config struct did not match; PEFT's bookkeeping keys and `also_ignored` pass.
/// `takes` lists the method's fields for the message.
pub fn refuse_unknown(
    method: &str,
    other: &Map<String, Value>,
    also_ignored: &[&str],
    takes: &str,
) -> Result<()> {
    let unknown: Vec<&String> = other
        .keys()
        .filter(|k| !PEFT_BOOKKEEPING.contains(&k.as_str()) && !also_ignored.contains(&k.as_str()))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(invalid(
            method,
            format!("unknown keys {unknown:?}; {method} takes {takes}"),
        ))
    }
}

/// Refuses the options of a saved LoRA-family config that change the math and that graft's
/// LoRA and AdaLoRA do not implement: `use_dora`, `fan_in_fan_out`, a `bias` other than "none".
pub fn refuse_lora_variants(method: &str, other: &Map<String, Value>) -> Result<()> {
    for key in ["use_dora", "fan_in_fan_out"] {
        if other.get(key) == Some(&Value::Bool(true)) {
            return Err(invalid(
                method,
                format!("`{key}: true` is not supported by this plugin"),
            ));
        }
    }
    match other.get("bias").and_then(Value::as_str) {
        Some(bias) if bias != "none" => Err(invalid(
            method,
            format!("bias `{bias}` is not supported (only \"none\")"),
        )),
        _ => Ok(()),
    }
}
