//! P-tuning v2 (Liu et al. 2022) as a graft plugin: deep prompts, i.e. trainable key/value
//! prefixes at every layer, without reparametrisation by default, read by a classification
//! head on the pooled output (no verbalizer).
//!
//! On disk it is Hugging Face PEFT's prefix tuning (`peft_type` PREFIX_TUNING,
//! `prompt_embeddings`, `prefix_projection` false) plus the head, so PEFT loads it as such.
//! The math is graft-peft's shared [`PrefixAdapter`]; this crate holds the paper's defaults.
mod config;

pub use config::PTuningV2Config;

use graft_peft::candle::Tensor;
use graft_peft::prompt_learning::PrefixAdapter;
use graft_peft::serde_json::Value;
use graft_peft::{Adapter, AttachContext, Method, Result};
use std::collections::HashMap;

pub struct PTuningV2;

graft_peft::export_plugin!(PTuningV2);

/// The method for static linking (tests, builds without dynamic loading).
pub fn method() -> Box<dyn Method> {
    Box::new(PTuningV2)
}

const NAME: &str = "p-tuning-v2";

impl Method for PTuningV2 {
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
        let config = PTuningV2Config::from_train_config(config)?;
        let hidden = config
            .prefix_projection
            .then(|| config.encoder_hidden_size.unwrap_or(ctx.info.hidden_size));
        Ok(Box::new(PrefixAdapter::create(
            NAME,
            config.num_virtual_tokens,
            hidden,
            config.prefix_dropout,
            ctx,
        )?))
    }

    fn load(
        &self,
        config: &Value,
        tensors: &HashMap<String, Tensor>,
        ctx: &AttachContext,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(PrefixAdapter::load(NAME, config, tensors, ctx)?))
    }
}
