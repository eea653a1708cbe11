//! Prompt tuning's configuration, with PEFT's field names and defaults.
use graft_peft::prompt_learning::VirtualTokens;
use graft_peft::serde_json::{Map, Value};
use graft_peft::{config, Error, Result};

pub(crate) const NAME: &str = "prompt-tuning";
use serde::{Deserialize, Serialize};

/// How the soft prompt starts (PEFT's `PromptTuningInit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PromptInit {
    /// normal(0, 1), like torch's nn.Embedding.
    #[default]
    Random,
    /// Rows of the word-embedding table at random token ids.
    SampleVocab,
    /// The embeddings of `prompt_tuning_init_text`'s tokens, repeated or cut to length.
    Text,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PromptTuningConfig {
    /// Soft-prompt positions prepended to the input embeddings.
    #[serde(default = "default_tokens")]
    pub num_virtual_tokens: usize,
    #[serde(default)]
    pub prompt_tuning_init: PromptInit,
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// PEFT's other fields: refused when training; when loading PEFT's files, refused unless
    /// off or read (`VirtualTokens::from_saved`).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_tokens() -> usize {
    20
}

/// Fields PEFT uses to find a tokenizer; graft tokenizes with the base model's own.
const TOKENIZER_FIELDS: &[&str] = &["tokenizer_name_or_path", "tokenizer_kwargs"];

impl PromptTuningConfig {
    /// From a training config: unknown keys are an error.
    pub fn from_train_config(value: &Value) -> Result<Self> {
        let config = Self::parse(value)?;
        config::refuse_unknown(
            NAME,
            &config.other,
            &[VirtualTokens::MODEL_FIELDS, TOKENIZER_FIELDS].concat(),
            "num_virtual_tokens, prompt_tuning_init, prompt_tuning_init_text",
        )?;
        match (config.prompt_tuning_init, &config.prompt_tuning_init_text) {
            (PromptInit::Text, None) => Err(invalid(
                "prompt_tuning_init = \"TEXT\" needs prompt_tuning_init_text".into(),
            )),
            (PromptInit::Text, Some(text)) if text.trim().is_empty() => {
                Err(invalid("prompt_tuning_init_text is empty".into()))
            }
            _ => Ok(config),
        }
    }

    /// From PEFT's adapter_config.json.
    pub fn from_adapter_config(value: &Value) -> Result<Self> {
        Self::parse(value)
    }

    fn parse(value: &Value) -> Result<Self> {
        let config: Self = config::parse(NAME, value)?;
        if config.num_virtual_tokens == 0 {
            return Err(invalid(
                "num_virtual_tokens must be at least 1, found 0".into(),
            ));
        }
        Ok(config)
    }
}

fn invalid(reason: String) -> Error {
    config::invalid("prompt-tuning", reason)
}
