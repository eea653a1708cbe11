//! The contract between graft and a PEFT method.
use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use graft_model::init::Dropout;
use graft_model::{Hooks, ModelInfo, SiteInfo};
use std::collections::HashMap;

/// What a method may know of the model it attaches to.
pub struct AttachContext<'a> {
    pub info: &'a ModelInfo,
    pub sites: &'a [SiteInfo],
    /// The dtype of the tensors the method trains: f32 (f64 in f64 tests), also on a bf16 or
    /// f16 base, which a method's hooks cast to (`x.dtype()`) as autocast does.
    pub dtype: DType,
    pub device: &'a Device,
    /// Seeds every random initial tensor the method makes.
    pub seed: u64,
    /// Every base tensor under its checkpoint key (full fine-tuning starts from them; prompt
    /// initialisation reads the word embeddings, `info.word_embeddings`).
    pub base_tensors: &'a [(String, Tensor)],
    /// Checkpoint keys of the base weights kept quantized (`[model] quantize`): frozen, and
    /// not among `base_tensors`.
    pub quantized: &'a [String],
    /// Token ids of a text as the model's tokenizer encodes it, special tokens included.
    pub tokenize: &'a dyn Fn(&str) -> Result<Vec<u32>>,
    /// Optimizer steps the training run will take (for budget schedules); 0 when not training.
    pub total_steps: usize,
}

impl AttachContext<'_> {
    /// The base tensor `key`.
    pub fn base_tensor(&self, key: &str) -> Result<&Tensor> {
        if self.is_quantized(key) {
            return Err(crate::Error::QuantizedBase {
                key: key.to_string(),
            });
        }
        self.base_tensors
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| t)
            .ok_or_else(|| crate::Error::MissingTensor {
                key: format!("{key} (in the base model)"),
            })
    }

    /// Whether the base keeps the weight `key` quantized.
    pub fn is_quantized(&self, key: &str) -> bool {
        self.quantized.iter().any(|k| k == key)
    }
}

/// A PEFT method: makes adapters, fresh or from saved files. One per plugin library.
pub trait Method: Send + Sync {
    /// Name on the command line and in configs, e.g. `lora`.
    fn name(&self) -> &'static str;
    /// Hugging Face PEFT's `peft_type`, e.g. `LORA`.
    fn peft_type(&self) -> &'static str;
    fn version(&self) -> &'static str;
    /// Prompt-learning methods (prefix, prompt, P-tuning) save the classifier head as
    /// `base_model.classifier.*`; the others as `base_model.model.classifier.*` (as PEFT does).
    fn is_prompt_learning(&self) -> bool {
        false
    }
    /// The adapter's tensors are the whole model (full fine-tuning): the host saves a Hugging
    /// Face model folder (config.json, model.safetensors with every tensor resolved through the
    /// adapter's [`graft_model::Hooks::parameter`]) instead of PEFT's adapter files, and
    /// reopens it with [`Method::load`] given no tensors.
    fn saves_full_model(&self) -> bool {
        false
    }
    /// The method's recommended `graft train` config (TOML: the paper-abstract recipe it was
    /// tuned on), which `graft train --method NAME` starts from when no `--config` is given: a
    /// method's defaults travel with the method. `None`: graft's generic defaults. An owned
    /// copy: the plugin's own text lives only as long as its library is loaded.
    fn recommended_config(&self) -> Option<String> {
        None
    }
    /// A new adapter from the method's config: PEFT's field names, unknown keys refused.
    fn create(&self, config: &serde_json::Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>>;
    /// An adapter from a saved `adapter_config.json` (unknown keys ignored, as PEFT writes many)
    /// and its tensors under their full PEFT keys.
    fn load(
        &self,
        config: &serde_json::Value,
        tensors: &HashMap<String, Tensor>,
        ctx: &AttachContext,
    ) -> Result<Box<dyn Adapter>>;
}

/// What a method crate implements: its two ways to make an adapter. [`plugin!`](crate::plugin)
/// gives it a name, a PEFT type and its crate's version, makes it a [`Method`], and exports it.
pub trait PluginMethod: Send + Sync {
    /// A new adapter from the method's config: PEFT's field names, unknown keys refused.
    fn create(&self, config: &serde_json::Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>>;
    /// An adapter from a saved adapter_config.json (unknown keys ignored, as PEFT writes many)
    /// and its tensors.
    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>>;
    /// See [`Method::recommended_config`]; in-tree plugins embed `configs/<name>.toml`.
    fn recommended_config(&self) -> Option<&'static str> {
        None
    }
}

/// A saved adapter as [`Method::load`] receives it.
pub struct Saved<'a> {
    /// adapter_config.json.
    pub config: &'a serde_json::Value,
    /// The method's tensors under their full PEFT keys.
    pub tensors: &'a HashMap<String, Tensor>,
}

impl Saved<'_> {
    /// The tensor `key`, checked to have `shape`.
    pub fn tensor(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        crate::adapter::take_tensor(self.tensors, key, shape)
    }
}

/// Makes a [`PluginMethod`] a [`Method`] and exports it from the plugin library
/// ([`export_plugin!`](crate::export_plugin)), with `pub fn method()` for static linking:
///
/// ```ignore
/// graft_peft::plugin!(Lora, "lora", "LORA");
/// impl graft_peft::PluginMethod for Lora { ... }
/// ```
///
/// The type (a unit struct the macro declares), the method's name, its PEFT type, then any of two flags: `prompt_learning` (the
/// head is saved as PEFT's prompt-learning methods save it) and `full_model` (the adapter is
/// the whole model; see [`Method::saves_full_model`]). The version is the plugin crate's own
/// (`CARGO_PKG_VERSION` where the macro expands).
#[macro_export]
macro_rules! plugin {
    ($method:ident, $name:expr, $peft_type:expr $(, $flag:ident)* $(,)?) => {
        /// The method; [`method`] makes it for static linking.
        pub struct $method;

        impl $crate::Method for $method {
            fn name(&self) -> &'static str {
                $name
            }
            fn peft_type(&self) -> &'static str {
                $peft_type
            }
            fn version(&self) -> &'static str {
                env!("CARGO_PKG_VERSION")
            }
            $($crate::plugin!(@flag $flag);)*
            fn recommended_config(&self) -> Option<String> {
                $crate::PluginMethod::recommended_config(self).map(str::to_string)
            }
            fn create(
                &self,
                config: &$crate::serde_json::Value,
                ctx: &$crate::AttachContext,
            ) -> $crate::Result<::std::boxed::Box<dyn $crate::Adapter>> {
                $crate::PluginMethod::create(self, config, ctx)
            }
            fn load(
                &self,
                config: &$crate::serde_json::Value,
                tensors: &::std::collections::HashMap<::std::string::String, $crate::candle::Tensor>,
                ctx: &$crate::AttachContext,
            ) -> $crate::Result<::std::boxed::Box<dyn $crate::Adapter>> {
                let saved = $crate::Saved { config, tensors };
                $crate::PluginMethod::load(self, &saved, ctx)
            }
        }

        $crate::export_plugin!($method);

        /// The method for static linking (tests, builds without dynamic loading).
        pub fn method() -> ::std::boxed::Box<dyn $crate::Method> {
            ::std::boxed::Box::new($method)
        }
    };
    (@flag prompt_learning) => {
        fn is_prompt_learning(&self) -> bool {
            true
        }
    };
    (@flag full_model) => {
        fn saves_full_model(&self) -> bool {
            true
        }
    };
}

/// What merging a method adds to one linear site: `W + weight`, `b + bias`.
#[derive(Debug, Clone)]
pub struct MergeDelta {
    pub site: String,
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, for methods that rescale a site's output, bias included (IA3).
    pub bias: Option<Tensor>,
}

/// A method attached to one model: the hooks it runs and the state it trains and saves.
pub trait Adapter: Hooks + Send + Sync {
    /// Trainable tensors under their PEFT keys (as saved, e.g.
    /// `base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`).
    fn trainable(&self) -> Vec<(String, Var)>;
    /// The method's dropout, if it has one: the defaults of [`Adapter::set_training`],
    /// [`Adapter::training_state`] and [`Adapter::restore_training_state`] act on it.
    fn dropout(&self) -> Option<&Dropout> {
        None
    }
    /// Training mode turns dropout on.
    fn set_training(&mut self, training: bool) {
        if let Some(dropout) = self.dropout() {
            dropout.set_training(training);
        }
    }
    /// A term added to the task loss (e.g. an orthogonality regulariser).
    fn extra_loss(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Called after every optimizer step (e.g. a rank budget update).
    fn after_step(&mut self, _step: usize, _grads: &GradStore) -> Result<()> {
        Ok(())
    }
    /// What training changes besides the trainable tensors (dropout RNG positions, running
    /// statistics), under names the method chooses: checkpoints save it so that a resumed run
    /// continues exactly as an uninterrupted one.
    fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .dropout()
            .map(Dropout::state)
            .transpose()?
            .into_iter()
            .collect())
    }
    /// Restores what [`Adapter::training_state`] returned.
    fn restore_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(dropout) = self.dropout() {
            dropout.restore(state)?;
        }
        Ok(())
    }
    /// The method's fields of `adapter_config.json` (peft_type and task fields are added by
    /// the host).
    fn config_json(&self) -> serde_json::Value;
    /// Tensors to save, under their full PEFT keys.
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect())
    }
    /// What merging adds to each linear site's base tensors, if the method can be merged.
    fn merge_deltas(&self) -> Result<Option<Vec<MergeDelta>>> {
        Ok(None)
    }
}
