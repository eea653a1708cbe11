//! __TITLE__: a graft PEFT method plugin, scaffolded by `cargo xtask new-plugin`.
//!
//! The method as generated is BitFit-style bias tuning (Ben Zaken et al. 2021): every target
//! linear site gets a trainable bias delta, `y = x·Wᵀ + b + Δb`, zero-initialised, mergeable.
//! Replace the math, keep the shape: config, `PluginMethod`, `Adapter` + `Hooks`, tests.
use graft_peft::candle::{Tensor, Var};
use graft_peft::graft_model::{Hooks, LinearSite};
use graft_peft::serde::Deserialize;
use graft_peft::serde_json::{json, Map, Value};
use graft_peft::{
    config, Adapter, AttachContext, MergeDelta, PluginMethod, Result, Saved, TargetModules,
};
use std::collections::BTreeMap;

const NAME: &str = "__NAME__";

/// The method's fields (its `[method]` table in a training config, and adapter_config.json).
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "graft_peft::serde")]
pub struct Settings {
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_targets() -> TargetModules {
    TargetModules::Names(vec!["query".into(), "value".into()])
}

// Declares the method's type with its name on the command line and its `peft_type` in
// adapter_config.json (not one of PEFT's types: graft writes it and reads it back), and exports
// it, with `method()` for the tests.
graft_peft::plugin!(__TITLE__, NAME, "__PEFT_TYPE__");

fn key(site: &str) -> String {
    format!("base_model.model.{site}.bias_delta")
}

impl PluginMethod for __TITLE__ {
    fn create(&self, settings: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let settings: Settings = config::parse(NAME, settings)?;
        config::refuse_unknown(NAME, &settings.other, &[], "target_modules")?;
        let mut deltas = BTreeMap::new();
        for site in settings.target_modules.select(NAME, ctx.sites)? {
            let zeros = Tensor::zeros(site.out_features, ctx.dtype, ctx.device)?;
            deltas.insert(
                site.name.clone(),
                (Var::from_tensor(&zeros)?, site.in_features),
            );
        }
        Ok(Box::new(BiasDeltas { settings, deltas }))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let settings: Settings = config::parse(NAME, saved.config)?;
        let mut deltas = BTreeMap::new();
        for site in settings.target_modules.select(NAME, ctx.sites)? {
            let tensor = saved.tensor(&key(&site.name), &[site.out_features])?;
            let delta = Var::from_tensor(&tensor.to_dtype(ctx.dtype)?)?;
            deltas.insert(site.name.clone(), (delta, site.in_features));
        }
        Ok(Box::new(BiasDeltas { settings, deltas }))
    }
}

pub struct BiasDeltas {
    settings: Settings,
    /// Per site: the bias delta `[out]` and the site's input width (for the merge's shapes).
    deltas: BTreeMap<String, (Var, usize)>,
}

impl Hooks for BiasDeltas {
    fn linear(
        &self,
        site: &LinearSite<'_>,
        _x: &Tensor,
        base: Tensor,
    ) -> graft_peft::candle::Result<Tensor> {
        match self.deltas.get(site.name) {
            Some((delta, _)) => base.broadcast_add(delta.as_tensor()),
            None => Ok(base),
        }
    }
}

impl Adapter for BiasDeltas {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.deltas
            .iter()
            .map(|(site, (delta, _))| (key(site), delta.clone()))
            .collect()
    }

    fn config_json(&self) -> Value {
        json!({ "target_modules": self.settings.target_modules.to_json() })
    }

    fn merge_deltas(&self) -> Result<Option<Vec<MergeDelta>>> {
        let mut merged = Vec::new();
        for (site, (delta, in_features)) in &self.deltas {
            let shape = (delta.dims()[0], *in_features);
            merged.push(MergeDelta {
                site: site.clone(),
                // The weight does not change; only the bias does.
                weight: Tensor::zeros(shape, delta.dtype(), delta.device())?,
                bias: Some(delta.as_tensor().clone()),
            });
        }
        Ok(Some(merged))
    }
}
