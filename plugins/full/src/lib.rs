//! Full fine-tuning as a graft plugin: every base tensor of the model is trained (through
//! [`Hooks::parameter`]), and the result is saved as a complete Hugging Face model folder.
//!
//! Cost: the trained copy sits beside the frozen base tensors the model keeps, so weights take
//! twice their size in memory, and AdamW adds two more copies. No adapter format: PEFT has
//! none for full fine-tuning, and transformers reads the saved folder directly.
use graft_peft::candle::{Tensor, Var};
use graft_peft::graft_model::{Acts, Hooks};
use graft_peft::serde_json::{json, Value};
use graft_peft::{Adapter, AttachContext, Error, PluginMethod, Result, Saved};
use std::collections::BTreeMap;

// `FULL` is not a PEFT type, and is written nowhere: the output is a model folder.
graft_peft::plugin!(Full, "full", "FULL", full_model);

impl PluginMethod for Full {
    /// configs/full.toml, the recipe `cargo xtask train --method full` documents.
    fn recommended_config(&self) -> Option<&'static str> {
        Some(include_str!("../../../configs/full.toml"))
    }

    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let unknown: Vec<&String> = config
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        if !unknown.is_empty() {
            return Err(Error::Config {
                method: "full".into(),
                reason: format!("unknown keys {unknown:?}; full fine-tuning takes none"),
            });
        }
        let mut params = BTreeMap::new();
        for (key, tensor) in ctx.base_tensors {
            let tensor = tensor.to_dtype(ctx.dtype)?.to_device(ctx.device)?;
            params.insert(key.clone(), Var::from_tensor(&tensor)?);
        }
        Ok(Box::new(FullAdapter { params }))
    }

    /// The host opens the saved model folder as the base model and asks for an adapter with
    /// no tensors: the model alone. Given tensors, they become the trained parameters.
    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let mut params = BTreeMap::new();
        for (key, base) in ctx.base_tensors {
            if saved.tensors.contains_key(key) {
                let t = saved.tensor(key, base.dims())?;
                params.insert(key.clone(), Var::from_tensor(&t.to_dtype(ctx.dtype)?)?);
            }
        }
        Ok(Box::new(FullAdapter { params }))
    }
}

/// Trained copies of the base tensors, by checkpoint key.
pub struct FullAdapter {
    params: BTreeMap<String, Var>,
}

impl Hooks for FullAdapter {
    /// Trains the sites' tensors through [`Hooks::parameter`], not their hooks (a trained
    /// tensor makes the model compose the site's ops anyway).
    fn acts_on(&self, _site: &str) -> Acts {
        Acts::Not
    }

    fn parameter(&self, key: &str) -> Option<Tensor> {
        self.params.get(key).map(|v| v.as_tensor().clone())
    }
}

impl Adapter for FullAdapter {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn config_json(&self) -> Value {
        json!({})
    }
}
