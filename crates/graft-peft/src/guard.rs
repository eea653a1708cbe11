//! The boundary between graft and plugin code: every call into a method or adapter runs under
//! `catch_unwind`, so a panicking plugin becomes an error for that run (the host keeps its
//! checkpoints and outputs), and every tensor a hook returns is checked against the shape and
//! dtype the hook's contract gives before the model uses it.
use crate::method::{Adapter, AttachContext, Method};
use crate::{PluginError, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use graft_model::{Acts, Hooks, LinearSite, LowRank, ModelInfo};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into())
}

fn panicked(path: &Path, call: &str, payload: Box<dyn std::any::Any + Send>) -> PluginError {
    PluginError::Panicked {
        path: path.to_path_buf(),
        call: call.to_string(),
        message: panic_message(payload),
    }
}

/// Runs `f`, turning a panic into [`PluginError::Panicked`].
fn guarded<T>(path: &Path, call: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(panicked(path, call, payload).into()))
}

/// The same for hooks, which return candle's errors.
fn guarded_hook<T>(
    path: &Path,
    call: &str,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(candle_core::Error::wrap(panicked(path, call, payload))))
}

fn check(
    path: &Path,
    hook: &str,
    tensor: &Tensor,
    dims: &[usize],
    dtype: DType,
) -> candle_core::Result<()> {
    if tensor.dims() != dims || tensor.dtype() != dtype {
        return Err(candle_core::Error::wrap(PluginError::BadHookOutput {
            path: path.to_path_buf(),
            hook: hook.to_string(),
            expected: format!("{dtype:?} {dims:?}"),
            found: format!("{:?} {:?}", tensor.dtype(), tensor.dims()),
        }));
    }
    Ok(())
}

/// A plugin's method behind the boundary.
pub struct GuardedMethod {
    inner: Box<dyn Method>,
    path: PathBuf,
}

impl GuardedMethod {
    pub fn new(inner: Box<dyn Method>, path: PathBuf) -> Self {
        Self { inner, path }
    }

    fn wrap(&self, adapter: Box<dyn Adapter>, ctx: &AttachContext) -> Box<dyn Adapter> {
        Box::new(GuardedAdapter {
            inner: adapter,
            path: self.path.clone(),
            info: ctx.info.clone(),
            dtype: ctx.dtype,
        })
    }
}

impl Method for GuardedMethod {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn peft_type(&self) -> &'static str {
        self.inner.peft_type()
    }
    fn version(&self) -> &'static str {
        self.inner.version()
    }
    fn is_prompt_learning(&self) -> bool {
        self.inner.is_prompt_learning()
    }
    fn saves_full_model(&self) -> bool {
        self.inner.saves_full_model()
    }
    fn recommended_config(&self) -> Option<String> {
        catch_unwind(AssertUnwindSafe(|| self.inner.recommended_config())).unwrap_or(None)
    }
    fn create(&self, config: &serde_json::Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let adapter = guarded(&self.path, "create", || self.inner.create(config, ctx))?;
        Ok(self.wrap(adapter, ctx))
    }
    fn load(
        &self,
        config: &serde_json::Value,
        tensors: &HashMap<String, Tensor>,
        ctx: &AttachContext,
    ) -> Result<Box<dyn Adapter>> {
        let adapter = guarded(&self.path, "load", || self.inner.load(config, tensors, ctx))?;
        Ok(self.wrap(adapter, ctx))
    }
}

/// An adapter behind the boundary, checking what its hooks return.
pub struct GuardedAdapter {
    inner: Box<dyn Adapter>,
    path: PathBuf,
    info: ModelInfo,
    dtype: DType,
}

impl Hooks for GuardedAdapter {
    /// A panic counts as "may act": the model then calls the hooks, which report it.
    fn acts_on(&self, site: &str) -> Acts {
        catch_unwind(AssertUnwindSafe(|| self.inner.acts_on(site))).unwrap_or(Acts::Any)
    }

    fn linear_input(
        &self,
        site: &LinearSite<'_>,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let out = guarded_hook(&self.path, "linear_input", || {
            self.inner.linear_input(site, x)
        })?;
        if let Some(input) = &out {
            check(
                &self.path,
                &format!("linear_input({})", site.name),
                input,
                x.dims(),
                x.dtype(),
            )?;
        }
        Ok(out)
    }

    fn low_rank(&self, site: &LinearSite<'_>, x: &Tensor) -> candle_core::Result<Option<LowRank>> {
        let out = guarded_hook(&self.path, "low_rank", || self.inner.low_rank(site, x))?;
        if let Some(update) = &out {
            let (out_f, in_f) = (site.out_features, site.in_features);
            let rank = update.a.dims().first().copied().unwrap_or(0);
            let hook = format!("low_rank({})", site.name);
            check(&self.path, &hook, &update.a, &[rank, in_f], x.dtype())?;
            check(&self.path, &hook, &update.b, &[out_f, rank], x.dtype())?;
            if let Some(mask) = &update.input_mask {
                check(&self.path, &hook, mask, x.dims(), x.dtype())?;
            }
        }
        Ok(out)
    }

    fn linear(
        &self,
        site: &LinearSite<'_>,
        x: &Tensor,
        base: Tensor,
    ) -> candle_core::Result<Tensor> {
        let (dims, dtype) = (base.dims().to_vec(), base.dtype());
        let out = guarded_hook(&self.path, "linear", || self.inner.linear(site, x, base))?;
        check(
            &self.path,
            &format!("linear({})", site.name),
            &out,
            &dims,
            dtype,
        )?;
        Ok(out)
    }

    fn prompt(&self, batch: usize) -> candle_core::Result<Option<Tensor>> {
        let out = guarded_hook(&self.path, "prompt", || self.inner.prompt(batch))?;
        if let Some(prompt) = &out {
            let n = prompt.dims().get(1).copied().unwrap_or(0);
            check(
                &self.path,
                "prompt",
                prompt,
                &[batch, n, self.info.hidden_size],
                self.dtype,
            )?;
        }
        Ok(out)
    }

    fn kv_prefix_len(&self) -> usize {
        catch_unwind(AssertUnwindSafe(|| self.inner.kv_prefix_len())).unwrap_or(0)
    }

    fn kv_prefix(
        &self,
        layer: usize,
        batch: usize,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let out = guarded_hook(&self.path, "kv_prefix", || {
            self.inner.kv_prefix(layer, batch)
        })?;
        if let Some((k, v)) = &out {
            let dims = [
                batch,
                self.kv_prefix_len(),
                self.info.num_kv_heads,
                self.info.head_dim,
            ];
            check(&self.path, "kv_prefix (key)", k, &dims, self.dtype)?;
            check(&self.path, "kv_prefix (value)", v, &dims, self.dtype)?;
        }
        Ok(out)
    }

    fn parameter(&self, key: &str) -> Option<Tensor> {
        // The model checks shape and dtype against the base tensor it replaces.
        catch_unwind(AssertUnwindSafe(|| self.inner.parameter(key))).unwrap_or(None)
    }
}

impl Adapter for GuardedAdapter {
    fn trainable(&self) -> Vec<(String, Var)> {
        catch_unwind(AssertUnwindSafe(|| self.inner.trainable())).unwrap_or_default()
    }
    /// The plugin's generator itself (graft-model's type, not plugin code): gradient
    /// checkpointing rewinds it to recompute a block with its forward's masks.
    fn dropout(&self) -> Option<&graft_model::init::Dropout> {
        catch_unwind(AssertUnwindSafe(|| self.inner.dropout())).unwrap_or(None)
    }
    fn set_training(&mut self, training: bool) {
        let inner = &mut self.inner;
        let _ = catch_unwind(AssertUnwindSafe(|| inner.set_training(training)));
    }
    fn extra_loss(&self) -> Result<Option<Tensor>> {
        guarded(&self.path, "extra_loss", || self.inner.extra_loss())
    }
    fn after_step(&mut self, step: usize, grads: &GradStore) -> Result<()> {
        let (inner, path) = (&mut self.inner, &self.path);
        guarded(path, "after_step", || inner.after_step(step, grads))
    }
    fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        guarded(&self.path, "training_state", || self.inner.training_state())
    }
    fn restore_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let (inner, path) = (&mut self.inner, &self.path);
        guarded(path, "restore_training_state", || {
            inner.restore_training_state(state)
        })
    }
    fn config_json(&self) -> serde_json::Value {
        catch_unwind(AssertUnwindSafe(|| self.inner.config_json())).unwrap_or_default()
    }
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        guarded(&self.path, "tensors", || self.inner.tensors())
    }
    fn merge_deltas(&self) -> Result<Option<Vec<crate::MergeDelta>>> {
        guarded(&self.path, "merge_deltas", || self.inner.merge_deltas())
    }
}
