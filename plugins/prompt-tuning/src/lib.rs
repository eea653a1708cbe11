//! Prompt tuning (Lester et al. 2021) as Hugging Face PEFT defines it, as a graft plugin: a
//! trainable soft prompt prepended to the input embeddings, nothing else.
//!
//! Same shape as every method crate: `config.rs`, `prompt.rs` (the initialisations), this
//! glue, tests.
mod config;
mod prompt;

pub use config::{PromptInit, PromptTuningConfig};
pub use prompt::initial_prompt;

use config::NAME;
use graft_peft::candle::{Tensor, Var};
use graft_peft::config::merge_json;
use graft_peft::graft_model::{Acts, Hooks};
use graft_peft::prompt_learning::{VirtualTokens, PROMPT_EMBEDDINGS};
use graft_peft::serde_json::{json, Value};
use graft_peft::{Adapter, AttachContext, PluginMethod, Result, Saved};

graft_peft::plugin!(PromptTuning, NAME, "PROMPT_TUNING", prompt_learning);

impl PluginMethod for PromptTuning {
    /// configs/prompt-tuning.toml, the recipe `cargo xtask train --method prompt-tuning` documents.
    fn recommended_config(&self) -> Option<&'static str> {
        Some(include_str!("../../../configs/prompt-tuning.toml"))
    }

    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = PromptTuningConfig::from_train_config(config)?;
        let tokens = VirtualTokens::for_model(NAME, config.num_virtual_tokens, ctx.info)?;
        let prompt = initial_prompt(&config, ctx)?;
        Ok(Box::new(PromptAdapter {
            prompt: Var::from_tensor(&prompt)?,
            config: config_json(&tokens, &config),
        }))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let tokens = VirtualTokens::from_saved(NAME, saved.config, ctx.info)?;
        let config = PromptTuningConfig::from_adapter_config(saved.config)?;
        let prompt = saved.tensor(
            PROMPT_EMBEDDINGS,
            &[tokens.num_virtual_tokens, tokens.token_dim],
        )?;
        Ok(Box::new(PromptAdapter {
            prompt: Var::from_tensor(&prompt.to_dtype(ctx.dtype)?)?,
            config: config_json(&tokens, &config),
        }))
    }
}

fn config_json(tokens: &VirtualTokens, config: &PromptTuningConfig) -> Value {
    merge_json(
        tokens.to_json(),
        json!({
            "prompt_tuning_init": config.prompt_tuning_init,
            "prompt_tuning_init_text": config.prompt_tuning_init_text,
            "tokenizer_name_or_path": null,
            "tokenizer_kwargs": null,
        }),
    )
}

/// A soft prompt `[n, hidden]` shared by every example of a batch.
pub struct PromptAdapter {
    prompt: Var,
    config: Value,
}

impl Hooks for PromptAdapter {
    /// Acts through prompts only: every linear site may run fused.
    fn acts_on(&self, _site: &str) -> Acts {
        Acts::Not
    }

    fn prompt(&self, batch: usize) -> graft_peft::candle::Result<Option<Tensor>> {
        let (n, h) = self.prompt.as_tensor().dims2()?;
        self.prompt
            .as_tensor()
            .unsqueeze(0)?
            .broadcast_as((batch, n, h))
            .map(Some)
    }
}

impl Adapter for PromptAdapter {
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![(PROMPT_EMBEDDINGS.to_string(), self.prompt.clone())]
    }

    fn config_json(&self) -> Value {
        self.config.clone()
    }
}
