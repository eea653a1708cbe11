//! Prefix tuning (Li and Liang 2021) as Hugging Face PEFT defines it, as a graft plugin:
//! trainable key/value prefixes in every attention layer, optionally reparametrised through an
//! MLP that saving folds into PEFT's `prompt_embeddings` table.
//!
//! Same shape as every method crate: `config.rs`, the math (here graft-peft's shared
//! [`graft_peft::prompt_learning::PrefixAdapter`], which P-tuning v2 uses too), this glue, tests.
mod config;

pub use config::PrefixTuningConfig;

use graft_peft::candle::Tensor;
use graft_peft::prompt_learning::PrefixAdapter;
use graft_peft::serde_json::Value;
use graft_peft::{Adapter, AttachContext, Method, Result};
use std::collections::HashMap;

pub struct PrefixTuning;

graft_peft::export_plugin!(PrefixTuning);

/// The method for static linking (tests, builds without dynamic loading).
pub fn method() -> Box<dyn Method> {
    Box::new(PrefixTuning)
}

const NAME: &str = "prefix-tuning";

impl Method for PrefixTuning {
    fn name(&self) -> &'static str {
        NAME
    }

    fn peft_type(&self) -> &'static str {
        "PREFIX_TUNING"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn is_prompt_learning(&self) -> bool {
        true
    }

    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = PrefixTuningConfig::from_train_config(config)?;
        let hidden = config
            .prefix_projection
            .then(|| config.encoder_hidden_size.unwrap_or(ctx.info.hidden_size));
        Ok(Box::new(PrefixAdapter::create(
            NAME,
            config.num_virtual_tokens,
            hidden,
            0.0,
            ctx,
        )?))
    }

    fn load(
        &self,
        config: &Value,
        tensors: &HashMap<String, Tensor>,
        ctx: &AttachContext,
    ) -> Result<Box<dyn Adapter>> {
        PrefixTuningConfig::from_adapter_config(config)?;
        Ok(Box::new(PrefixAdapter::load(NAME, config, tensors, ctx)?))
    }
}
