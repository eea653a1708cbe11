//! Prefix tuning (Li and Liang 2021) as Hugging Face PEFT defines it, as a graft plugin:
//! trainable key/value prefixes in every attention layer, optionally reparametrised through an
//! MLP that saving folds into PEFT's `prompt_embeddings` table.
//!
//! Same shape as every method crate: `config.rs`, the math (here graft-peft's shared
//! [`graft_peft::prompt_learning::PrefixEncoder`], which P-tuning v2 uses too), this glue, tests.
mod config;

pub use config::PrefixTuningConfig;

use graft_peft::candle::Tensor;
use graft_peft::graft_model::init;
use graft_peft::prompt_learning::{
    merge_json, PrefixAdapter, PrefixEncoder, VirtualTokens, PROMPT_EMBEDDINGS,
};
use graft_peft::serde_json::{json, Value};
use graft_peft::{adapter, Adapter, AttachContext, Method, Result};
use std::collections::HashMap;

pub struct PrefixTuning;

graft_peft::export_plugin!(PrefixTuning);

/// The method for static linking (tests, builds without dynamic loading).
pub fn method() -> Box<dyn Method> {
    Box::new(PrefixTuning)
}

const NAME: &str = "prefix-tuning";

fn config_json(tokens: &VirtualTokens, config: &PrefixTuningConfig) -> Value {
    merge_json(
        tokens.to_json(),
        json!({
            "prefix_projection": config.prefix_projection,
            "encoder_hidden_size": config.encoder_hidden_size.unwrap_or(tokens.token_dim),
        }),
    )
}

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
        let tokens = VirtualTokens::for_model(NAME, config.num_virtual_tokens, ctx.info)?;
        let hidden = config
            .prefix_projection
            .then(|| config.encoder_hidden_size.unwrap_or(tokens.token_dim));
        let encoder = PrefixEncoder::new(
            &mut init::seeded_rng(ctx.seed),
            config.num_virtual_tokens,
            ctx.info,
            hidden,
            ctx.dtype,
            ctx.device,
        )?;
        // Saved without the projection, so the saved config says so too.
        let saved = PrefixTuningConfig {
            prefix_projection: false,
            ..config.clone()
        };
        Ok(Box::new(PrefixAdapter::new(
            encoder,
            config_json(&tokens, &saved),
            0.0,
            ctx.seed,
        )?))
    }

    fn load(
        &self,
        config: &Value,
        tensors: &HashMap<String, Tensor>,
        ctx: &AttachContext,
    ) -> Result<Box<dyn Adapter>> {
        let tokens = VirtualTokens::from_saved(NAME, config, ctx.info)?;
        let config = PrefixTuningConfig::from_adapter_config(config)?;
        let table = adapter::take_tensor(
            tensors,
            PROMPT_EMBEDDINGS,
            &[config.num_virtual_tokens, PrefixEncoder::width(ctx.info)],
        )?;
        let encoder = PrefixEncoder::from_table(&table.to_dtype(ctx.dtype)?, ctx.info)?;
        let saved = PrefixTuningConfig {
            prefix_projection: false,
            ..config
        };
        Ok(Box::new(PrefixAdapter::new(
            encoder,
            config_json(&tokens, &saved),
            0.0,
            ctx.seed,
        )?))
    }
}
