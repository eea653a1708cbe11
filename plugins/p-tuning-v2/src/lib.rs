//! P-tuning v2 (Liu et al. 2022) as a graft plugin: deep prompts, i.e. trainable key/value
//! prefixes at every layer, without reparametrisation by default, read by a classification
//! head on the pooled output (no verbalizer).
//!
//! On disk it is Hugging Face PEFT's prefix tuning (`peft_type` PREFIX_TUNING,
//! `prompt_embeddings`, `prefix_projection` false) plus the head, so PEFT loads it as such.
//! The math is graft-peft's shared [`PrefixAdapter`]; this crate holds the paper's defaults.
mod config;

pub use config::PTuningV2Config;

use config::NAME;
use graft_peft::prompt_learning::PrefixAdapter;
use graft_peft::serde_json::Value;
use graft_peft::{Adapter, AttachContext, PluginMethod, Result, Saved};

graft_peft::plugin!(PTuningV2, NAME, "PREFIX_TUNING", prompt_learning);

impl PluginMethod for PTuningV2 {
    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = PTuningV2Config::from_train_config(config)?;
        let dropout = config.prefix_dropout;
        Ok(Box::new(config.prefix.adapter(NAME, dropout, ctx)?))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(PrefixAdapter::load(NAME, saved, ctx)?))
    }
}
