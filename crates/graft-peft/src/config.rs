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
        return Ok(());
    }
    let fields: Vec<&str> = takes
        .split([',', ' ', '(', ')'])
        .filter(|w| !w.is_empty() && w.contains(|c: char| c.is_ascii_lowercase()))
        .collect();
    let hints: String = unknown
        .iter()
        .filter_map(|k| did_you_mean(k, &fields).map(|f| format!(" (`{k}`: did you mean `{f}`?)")))
        .collect();
    Err(invalid(
        method,
        format!("unknown keys {unknown:?}{hints}; {method} takes {takes}"),
    ))
}

/// The candidate closest to `unknown` by edit distance, if it is close enough to be a typo.
pub fn did_you_mean<'a>(unknown: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (unknown.chars().count() / 3).max(2);
    candidates
        .iter()
        .map(|c| (edit_distance(unknown, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// serde's "unknown field `x`, expected one of `a`, `b`" with a did-you-mean hint appended.
pub fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.split("unknown field `").nth(1) else {
        return message.to_string();
    };
    let unknown = rest.split('`').next().unwrap_or_default();
    let expected: Vec<&str> = rest
        .split("expected")
        .nth(1)
        .map(|list| list.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default();
    match did_you_mean(unknown, &expected) {
        Some(field) => format!("{} (did you mean `{field}`?)", message.trim_end()),
        None => message.to_string(),
    }
}

/// Keys of adapter_config.json that describe the file rather than the math: read with any
/// value.
pub const PEFT_DESCRIPTIVE: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
];

/// The modules whose saved copies graft reads: the classification head (`classifier` in BERT,
/// `score` in decoders).
pub const HEAD_MODULES: &[&str] = &["classifier", "score"];

/// Is `value` one PEFT writes for a feature that is off: null, false, or empty?
fn is_off(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Refuses, by name, every field of a saved adapter_config.json that `method` would otherwise
/// ignore while it changes what the adapter computes. `other` holds the fields the method's
/// config did not take. A field passes when it is descriptive ([`PEFT_DESCRIPTIVE`]), when
/// it is off (null, false, empty), when `inert` lists it with that value (repeat a key for
/// several values; `Value::Null` as the value: any value, for a field the method checks
/// itself), or when it is `modules_to_save` naming only the classification head. Anything else,
/// fields of a later PEFT included, is an error naming the field: graft refuses rather than
/// misreads an adapter.
pub fn refuse_unimplemented(
    method: &str,
    other: &Map<String, Value>,
    inert: &[(&str, Value)],
) -> Result<()> {
    for (key, value) in other {
        if PEFT_DESCRIPTIVE.contains(&key.as_str()) || is_off(value) {
            continue;
        }
        if key == "modules_to_save" {
            let head_only = value.as_array().is_some_and(|names| {
                names
                    .iter()
                    .all(|m| m.as_str().is_some_and(|m| HEAD_MODULES.contains(&m)))
            });
            if head_only {
                continue;
            }
            return Err(invalid(
                method,
                format!(
                    "`modules_to_save` = {value}: graft loads the saved copies of {HEAD_MODULES:?} only, so the adapter would be misread"
                ),
            ));
        }
        let listed: Vec<&Value> = inert
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect();
        if listed.iter().any(|v| v.is_null() || *v == value) {
            continue;
        }
        let accepted = if listed.is_empty() {
            "null, false or empty".to_string()
        } else {
            let values: Vec<String> = listed.iter().map(|v| v.to_string()).collect();
            format!("null, false, empty or {}", values.join(", "))
        };
        return Err(invalid(
            method,
            format!(
                "`{key}` = {value} is not implemented by graft's {method} (it accepts {accepted} there); refusing rather than misreading the adapter"
            ),
        ));
    }
    Ok(())
}

/// The LoRA family's saved fields that graft reads as PEFT's defaults at these values.
pub fn lora_family_inert() -> Vec<(&'static str, Value)> {
    vec![
        ("bias", Value::from("none")),
        // Initialisation schemes that leave the base weights as they were.
        ("init_lora_weights", Value::from(true)),
        ("init_lora_weights", Value::from("gaussian")),
        ("megatron_core", Value::from("megatron.core")),
        // Only read with use_qalora.
        ("qalora_group_size", Value::from(16)),
    ]
}

/// `value` with `field` set to PEFT's default targets for `model_type` when it names none, so
/// that a config without `target_modules` means the same on every architecture as in PEFT.
pub fn with_default_targets(
    value: &Value,
    field: &str,
    kind: crate::targets::DefaultTargets,
    method: &str,
    model_type: &str,
) -> Result<Value> {
    let mut value = value.clone();
    if let Value::Object(map) = &mut value {
        if !map.contains_key(field) || map[field].is_null() {
            let targets = crate::TargetModules::default_for(kind, method, model_type)?;
            map.insert(field.to_string(), targets.to_json());
        }
    }
    Ok(value)
}

/// `value` with LoRA-family targets (PEFT's query/value defaults for the model) where it
/// names none: LoRA's and AdaLoRA's `target_modules`.
pub fn with_query_value_targets(
    value: &Value,
    method: &str,
    ctx: &crate::AttachContext,
) -> Result<Value> {
    with_default_targets(
        value,
        "target_modules",
        crate::DefaultTargets::QueryValue,
        method,
        &ctx.info.model_type,
    )
}

/// The fields LoRA-family configs share, with PEFT's names and defaults; each method's
/// config flattens them in.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct LowRankFields {
    /// Scale numerator (each method says what it divides by).
    #[serde(default = "default_lora_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the update's input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which linear sites get an update.
    #[serde(default = "query_value_targets")]
    pub target_modules: crate::TargetModules,
}

impl LowRankFields {
    /// Refuses a `lora_alpha` that is not positive and a `lora_dropout` outside [0, 1).
    pub fn check(&self, method: &str) -> Result<()> {
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(invalid(
                method,
                format!("lora_alpha must be positive, found {}", self.lora_alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(
                method,
                format!(
                    "lora_dropout must be in [0, 1), found {}",
                    self.lora_dropout
                ),
            ));
        }
        Ok(())
    }

    /// These fields in adapter_config.json, with PEFT's for the options graft leaves at their
    /// defaults (no bias training, no DoRA, PEFT's initialisation), merged into `method_fields`.
    pub fn to_json(&self, method_fields: Value) -> Value {
        let fields = serde_json::json!({
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules.to_json(),
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "init_lora_weights": true,
        });
        merge_json(fields, method_fields)
    }
}

/// PEFT's BERT query/value targets, the serde default of LoRA-family configs;
/// [`with_query_value_targets`] fills in other architectures' before parsing.
pub fn query_value_targets() -> crate::TargetModules {
    crate::TargetModules::Names(vec!["query".into(), "value".into()])
}

/// Adds the fields of `extra` (an object) to `base` (an object).
pub fn merge_json(mut base: Value, extra: Value) -> Value {
    if let (Some(out), Value::Object(fields)) = (base.as_object_mut(), extra) {
        out.extend(fields);
    }
    base
}

/// PEFT's `lora_alpha` default.
pub fn default_lora_alpha() -> f64 {
    8.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_get_the_nearest_field() {
        assert_eq!(did_you_mean("lrr", &["lr", "seed"]), Some("lr"));
        assert_eq!(
            did_you_mean("lora_alhpa", &["r", "lora_alpha"]),
            Some("lora_alpha")
        );
        assert_eq!(did_you_mean("banana", &["lr", "seed"]), None);
        let message = "unknown field `batchsize`, expected one of `seed`, `batch_size`";
        assert!(with_suggestion(message).ends_with("(did you mean `batch_size`?)"));
        assert_eq!(with_suggestion("other error"), "other error");
    }
}
