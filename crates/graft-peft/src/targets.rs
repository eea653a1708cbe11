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
