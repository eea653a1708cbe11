//! PEFT's `target_modules`: a list matches module-name suffixes, a string is a full-match regex.
use crate::{Error, Result};
use graft_model::SiteInfo;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

impl TargetModules {
    /// Does the site `name` match? A list entry matches the whole name or its last dotted
    /// components (`value` matches `...attention.self.value`).
    pub fn matches(&self, name: &str) -> Result<bool> {
        Ok(match self {
            Self::Names(names) => names
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Self::Regex(pattern) => regex::Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|e| Error::Config {
                    method: "target_modules".into(),
                    reason: format!("`{pattern}` is not a valid regex: {e}"),
                })?
                .is_match(name),
        })
    }

    /// The sites this selects, in model order; an empty selection is an error.
    pub fn select<'a>(&self, method: &str, sites: &'a [SiteInfo]) -> Result<Vec<&'a SiteInfo>> {
        let mut selected = Vec::new();
        for site in sites {
            if self.matches(&site.name)? {
                selected.push(site);
            }
        }
        if selected.is_empty() {
            return Err(Error::NoTargetMatch {
                method: method.to_string(),
                pattern: serde_json::to_string(self).unwrap_or_default(),
                example: sites.first().map(|s| s.name.clone()).unwrap_or_default(),
            });
        }
        Ok(selected)
    }

    /// As PEFT writes it in adapter_config.json.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Which of PEFT's per-architecture default target lists a method starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultTargets {
    /// LoRA and AdaLoRA: the query and value projections.
    QueryValue,
    /// IA3: keys, values and the feed-forward output projection.
    Ia3,
    /// IA3's feed-forward subset (rescaled on the input).
    Ia3FeedForward,
}

impl TargetModules {
    /// Hugging Face PEFT's default for `model_type` (its
    /// `TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING`), for configs that name no targets.
    pub fn default_for(kind: DefaultTargets, method: &str, model_type: &str) -> Result<Self> {
        let names: &[&str] = match (kind, model_type) {
            (DefaultTargets::QueryValue, "bert") => &["query", "value"],
            (DefaultTargets::QueryValue, "llama" | "mistral" | "qwen2") => &["q_proj", "v_proj"],
            (DefaultTargets::QueryValue, "chatglm") => &["query_key_value"],
            (DefaultTargets::Ia3, "bert") => &["key", "value", "output.dense"],
            (DefaultTargets::Ia3, "llama" | "mistral" | "qwen2") => {
                &["k_proj", "v_proj", "down_proj"]
            }
            (DefaultTargets::Ia3, "chatglm") => &["query_key_value", "dense_4h_to_h"],
            (DefaultTargets::Ia3FeedForward, "bert") => &["output.dense"],
            (DefaultTargets::Ia3FeedForward, "llama" | "mistral" | "qwen2") => &["down_proj"],
            (DefaultTargets::Ia3FeedForward, "chatglm") => &["dense_4h_to_h"],
            _ => {
                return Err(Error::Config {
                    method: method.to_string(),
                    reason: format!(
                        "no default target_modules for model_type `{model_type}`; name them"
                    ),
                })
            }
        };
        Ok(Self::Names(names.iter().map(|n| n.to_string()).collect()))
    }

    /// `configured`, or PEFT's default for the model when the config names none.
    pub fn or_default(
        configured: &Option<Self>,
        kind: DefaultTargets,
        method: &str,
        model_type: &str,
    ) -> Result<Self> {
        match configured {
            Some(t) => Ok(t.clone()),
            None => Self::default_for(kind, method, model_type),
        }
    }
}
