//! Prefix tuning (Li and Liang 2021) as Hugging Face PEFT defines it, as a graft plugin:
//! trainable key/value prefixes in every attention layer, optionally reparametrised through an
//! MLP that saving folds into PEFT's `prompt_embeddings` table.
//!
//! Same shape as every method crate: `config.rs`, the math (here graft-peft's shared
//! [`graft_peft::prompt_learning::PrefixAdapter`], which P-tuning v2 uses too), this glue, tests.
mod config;

pub use config::PrefixTuningConfig;

use config::NAME;
use graft_peft::prompt_learning::PrefixAdapter;
use graft_peft::serde_json::Value;
use graft_peft::{Adapter, AttachContext, PluginMethod, Result, Saved};

graft_peft::plugin!(PrefixTuning, NAME, "PREFIX_TUNING", prompt_learning);

impl PluginMethod for PrefixTuning {
    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = PrefixTuningConfig::from_train_config(config)?;
        Ok(Box::new(config.prefix.adapter(NAME, 0.0, ctx)?))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        PrefixTuningConfig::from_adapter_config(saved.config)?;
        Ok(Box::new(PrefixAdapter::load(NAME, saved, ctx)?))
    }
}
