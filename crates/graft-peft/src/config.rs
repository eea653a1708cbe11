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
