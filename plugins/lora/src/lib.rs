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
use graft_peft::graft_model::{Acts, Hooks, LinearSite, LowRank};
use graft_peft::serde_json::Value;
use graft_peft::{Adapter, AttachContext, MergeDelta, PluginMethod, Result, Saved};
use std::collections::{BTreeMap, HashMap};

graft_peft::plugin!(Lora, "lora", "LORA");

fn key(site: &str, part: &str) -> String {
    format!("base_model.model.{site}.{part}.weight")
}

/// `config` with PEFT's default targets for the model where it names none.
fn with_default_targets(config: &Value, ctx: &AttachContext) -> Result<Value> {
    graft_peft::config::with_default_targets(
        config,
        "target_modules",
        graft_peft::DefaultTargets::QueryValue,
        "lora",
        &ctx.info.model_type,
    )
}

impl PluginMethod for Lora {
    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = LoraConfig::from_train_config(&with_default_targets(config, ctx)?)?;
        let mut rng = init::seeded_rng(ctx.seed);
        let mut layers = BTreeMap::new();
        for site in config.target_modules.select("lora", ctx.sites)? {
            let bound = init::kaiming_uniform_bound(site.in_features);
            let a = init::uniform(
                &mut rng,
                &[config.r, site.in_features],
                bound,
                ctx.dtype,
                ctx.device,
            )?;
            let b = Tensor::zeros((site.out_features, config.r), ctx.dtype, ctx.device)?;
            layers.insert(site.name.clone(), new_layer(a, b, config.scale())?);
        }
        Ok(Box::new(LoraAdapter::new(config, layers, ctx.seed)))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = LoraConfig::from_adapter_config(&with_default_targets(saved.config, ctx)?)?;
        let mut layers = BTreeMap::new();
        for site in config.target_modules.select("lora", ctx.sites)? {
            let a = saved.tensor(&key(&site.name, "lora_A"), &[config.r, site.in_features])?;
            let b = saved.tensor(&key(&site.name, "lora_B"), &[site.out_features, config.r])?;
            layers.insert(
                site.name.clone(),
                new_layer(
                    a.to_dtype(ctx.dtype)?,
                    b.to_dtype(ctx.dtype)?,
                    config.scale(),
                )?,
            );
        }
        Ok(Box::new(LoraAdapter::new(config, layers, ctx.seed)))
    }
}

fn new_layer(a: Tensor, b: Tensor, scale: f64) -> Result<LoraLayer> {
    Ok(LoraLayer {
        a: Var::from_tensor(&a)?,
        b: Var::from_tensor(&b)?,
        scale,
    })
}

pub struct LoraAdapter {
    config: LoraConfig,
    /// By site name; a BTreeMap so that saving and listing follow a stable order.
    layers: BTreeMap<String, LoraLayer>,
    training: bool,
    /// Dropout masks come from here, so a seeded run is reproducible.
    dropout: Dropout,
}

impl LoraAdapter {
    fn new(config: LoraConfig, layers: BTreeMap<String, LoraLayer>, seed: u64) -> Self {
        Self {
            dropout: Dropout::new(config.lora_dropout, seed ^ 0x10_4a_d0),
            config,
            layers,
            training: false,
        }
    }

    pub fn layers(&self) -> &BTreeMap<String, LoraLayer> {
        &self.layers
    }

    fn dropout_mask(&self, x: &Tensor) -> graft_peft::candle::Result<Option<Tensor>> {
        if !self.training {
            return Ok(None);
        }
        self.dropout.mask(x.dims(), x.dtype(), x.device())
    }
}

impl Hooks for LoraAdapter {
    fn acts_on(&self, site: &str) -> Acts {
        match self.layers.contains_key(site) {
            true => Acts::LowRankOnly,
            false => Acts::Not,
        }
    }

    fn low_rank(
        &self,
        site: &LinearSite<'_>,
        x: &Tensor,
    ) -> graft_peft::candle::Result<Option<LowRank>> {
        match self.layers.get(site.name) {
            Some(layer) => Ok(Some(layer.update(x.dtype(), self.dropout_mask(x)?)?)),
            None => Ok(None),
        }
    }
}

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

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![self.dropout.state()?])
    }

    fn restore_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        Ok(self.dropout.restore(state)?)
    }

    fn config_json(&self) -> Value {
        self.config.to_json()
    }

    fn merge_deltas(&self) -> Result<Option<Vec<MergeDelta>>> {
        let mut deltas = Vec::with_capacity(self.layers.len());
        for (site, layer) in &self.layers {
            deltas.push(MergeDelta {
                site: site.clone(),
                weight: layer.delta_weight()?,
                bias: None,
            });
        }
        Ok(Some(deltas))
    }
}
