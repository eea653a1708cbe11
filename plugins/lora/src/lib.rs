//! LoRA (Hu et al. 2021) as Hugging Face PEFT defines it, as a graft plugin.
//!
//! Same shape as every method crate: `config.rs` (PEFT's fields), `layer.rs` (the math), this
//! file (the glue to graft-peft's traits), tests beside them.
mod config;
mod layer;

pub use config::LoraConfig;
pub use layer::LoraLayer;

use graft_peft::candle::{Tensor, Var};
use graft_peft::graft_model::init::{self, Dropout};
use graft_peft::serde_json::Value;
use graft_peft::{Adapter, AttachContext, MergeDelta, PluginMethod, Result, Saved, SiteLayers};
use std::collections::BTreeMap;

graft_peft::plugin!(Lora, "lora", "LORA");

fn key(site: &str, part: &str) -> String {
    format!("base_model.model.{site}.{part}.weight")
}

impl PluginMethod for Lora {
    /// configs/lora.toml, the recipe `cargo xtask train --method lora` documents.
    fn recommended_config(&self) -> Option<&'static str> {
        Some(include_str!("../../../configs/lora.toml"))
    }

    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = LoraConfig::from_train_config(&graft_peft::config::with_query_value_targets(
            config, "lora", ctx,
        )?)?;
        let mut rng = init::seeded_rng(ctx.seed);
        let mut layers = BTreeMap::new();
        for site in config.low_rank.target_modules.select("lora", ctx.sites)? {
            let bound = init::kaiming_uniform_bound(site.in_features);
            let a = init::uniform(
                &mut rng,
                &[config.r, site.in_features],
                bound,
                ctx.dtype,
                ctx.device,
            )?;
            let b = Tensor::zeros((site.out_features, config.r), ctx.dtype, ctx.device)?;
            layers.insert(site.name.clone(), LoraLayer::new([a, b], config.scale())?);
        }
        Ok(Box::new(LoraAdapter::new(config, layers, ctx.seed)))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = LoraConfig::from_adapter_config(
            &graft_peft::config::with_query_value_targets(saved.config, "lora", ctx)?,
        )?;
        let mut layers = BTreeMap::new();
        for site in config.low_rank.target_modules.select("lora", ctx.sites)? {
            let a = saved.tensor(&key(&site.name, "lora_A"), &[config.r, site.in_features])?;
            let b = saved.tensor(&key(&site.name, "lora_B"), &[site.out_features, config.r])?;
            layers.insert(
                site.name.clone(),
                LoraLayer::new(
                    [a.to_dtype(ctx.dtype)?, b.to_dtype(ctx.dtype)?],
                    config.scale(),
                )?,
            );
        }
        Ok(Box::new(LoraAdapter::new(config, layers, ctx.seed)))
    }
}

pub struct LoraAdapter {
    config: LoraConfig,
    layers: SiteLayers<LoraLayer>,
    /// Dropout masks come from here, so a seeded run is reproducible.
    dropout: Dropout,
}

impl LoraAdapter {
    fn new(config: LoraConfig, layers: BTreeMap<String, LoraLayer>, seed: u64) -> Self {
        Self {
            dropout: Dropout::new(config.low_rank.lora_dropout, seed ^ 0x10_4a_d0),
            config,
            layers: SiteLayers::new(layers),
        }
    }

    pub fn layers(&self) -> &BTreeMap<String, LoraLayer> {
        &self.layers
    }
}

graft_peft::low_rank_hooks!(LoraAdapter);

impl Adapter for LoraAdapter {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|(site, l)| {
                [
                    (key(site, "lora_A"), l.a.clone()),
                    (key(site, "lora_B"), l.b.clone()),
                ]
            })
            .collect()
    }

    fn dropout(&self) -> Option<&Dropout> {
        Some(&self.dropout)
    }

    fn config_json(&self) -> Value {
        self.config.to_json()
    }

    fn merge_deltas(&self) -> Result<Option<Vec<MergeDelta>>> {
        self.layers
            .merge_deltas(|layer| Ok((layer.delta_weight()?, None)))
    }
}
