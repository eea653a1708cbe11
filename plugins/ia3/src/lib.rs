//! IA3 (Liu et al. 2022) as Hugging Face PEFT defines it, as a graft plugin: learned vectors
//! that rescale attention keys and values (outputs) and feed-forward inputs, mergeable into
//! the base weights.
//!
//! Same shape as every method crate: `config.rs` (PEFT's fields), `layer.rs` (the math), this
//! file (the glue to graft-peft's traits), tests beside them.
mod config;
mod layer;

pub use config::Ia3Config;
pub use layer::Ia3Layer;

use graft_peft::candle::{Tensor, Var};
use graft_peft::graft_model::{init, Acts, Hooks, LinearSite, SiteInfo};
use graft_peft::serde_json::Value;
use graft_peft::{Adapter, AttachContext, MergeDelta, PluginMethod, Result, Saved, SiteLayers};
use std::collections::BTreeMap;

graft_peft::plugin!(Ia3, "ia3", "IA3");

/// PEFT's key (a ParameterDict entry: no `.weight`).
fn key(site: &str) -> String {
    format!("base_model.model.{site}.ia3_l")
}

/// `[out, 1]` for output scaling, `[1, in]` for input scaling.
fn shape(site: &SiteInfo, feedforward: bool) -> [usize; 2] {
    if feedforward {
        [1, site.in_features]
    } else {
        [site.out_features, 1]
    }
}

/// `config` with PEFT's default targets for the model where it names none.
fn default_targets(config: &Value, ctx: &AttachContext) -> Result<Value> {
    let model_type = &ctx.info.model_type;
    let config = graft_peft::config::with_default_targets(
        config,
        "target_modules",
        graft_peft::DefaultTargets::Ia3,
        "ia3",
        model_type,
    )?;
    graft_peft::config::with_default_targets(
        &config,
        "feedforward_modules",
        graft_peft::DefaultTargets::Ia3FeedForward,
        "ia3",
        model_type,
    )
}

impl Ia3 {
    /// The layers of every target site, their vectors from `scale`.
    fn attach(
        config: Ia3Config,
        ctx: &AttachContext,
        mut scale: impl FnMut(&SiteInfo, [usize; 2]) -> Result<Tensor>,
    ) -> Result<Box<dyn Adapter>> {
        let targets = config.target_modules.select("ia3", ctx.sites)?;
        let mut layers = BTreeMap::new();
        for site in ctx.sites {
            let feedforward = config.feedforward_modules.matches(&site.name)?;
            if !targets.iter().any(|t| t.name == site.name) {
                if feedforward {
                    return Err(config::feedforward_not_targeted(&site.name));
                }
                continue;
            }
            let key = format!("{}.weight", site.name);
            let weight = match ctx.is_quantized(&key) {
                true => None,
                false => Some(ctx.base_tensor(&key)?.clone()),
            };
            let bias = ctx
                .base_tensor(&format!("{}.bias", site.name))
                .ok()
                .cloned();
            let l = scale(site, shape(site, feedforward))?;
            layers.insert(
                site.name.clone(),
                Ia3Layer {
                    scale: Var::from_tensor(&l.to_dtype(ctx.dtype)?)?,
                    feedforward,
                    weight,
                    bias,
                },
            );
        }
        Ok(Box::new(Ia3Adapter {
            config,
            layers: SiteLayers::new(layers),
        }))
    }
}

impl PluginMethod for Ia3 {
    /// configs/ia3.toml, the recipe `cargo xtask train --method ia3` documents.
    fn recommended_config(&self) -> Option<&'static str> {
        Some(include_str!("../../../configs/ia3.toml"))
    }

    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = Ia3Config::from_train_config(&default_targets(config, ctx)?)?;
        let mut rng = init::seeded_rng(ctx.seed);
        let ones = config.init_ia3_weights;
        Self::attach(config, ctx, |_, shape| {
            // PEFT: ones, or torch.randn without init_ia3_weights.
            Ok(if ones {
                Tensor::ones(&shape, ctx.dtype, ctx.device)?
            } else {
                init::normal(&mut rng, &shape, 1.0, ctx.dtype, ctx.device)?
            })
        })
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = Ia3Config::from_adapter_config(&default_targets(saved.config, ctx)?)?;
        Self::attach(config, ctx, |site, shape| {
            saved.tensor(&key(&site.name), &shape)
        })
    }
}

pub struct Ia3Adapter {
    config: Ia3Config,
    layers: SiteLayers<Ia3Layer>,
}

impl Hooks for Ia3Adapter {
    fn acts_on(&self, site: &str) -> Acts {
        self.layers.acts_on(site, Acts::Any)
    }

    fn linear(
        &self,
        site: &LinearSite<'_>,
        _x: &Tensor,
        base: Tensor,
    ) -> graft_peft::candle::Result<Tensor> {
        match self.layers.get(site.name) {
            Some(layer) => layer.output(base),
            None => Ok(base),
        }
    }

    fn linear_input(
        &self,
        site: &LinearSite<'_>,
        x: &Tensor,
    ) -> graft_peft::candle::Result<Option<Tensor>> {
        self.layers.at(site.name, |layer| layer.input(x))
    }
}

impl Adapter for Ia3Adapter {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .map(|(site, l)| (key(site), l.scale.clone()))
            .collect()
    }

    fn config_json(&self) -> Value {
        self.config.to_json()
    }

    fn merge_deltas(&self) -> Result<Option<Vec<MergeDelta>>> {
        self.layers.merge_deltas(|layer| Ok(layer.deltas()?))
    }
}
