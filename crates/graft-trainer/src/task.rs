//! A sequence classifier with its method attached: what train, eval, predict and merge share.
use crate::error::io_error;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use graft_model::classify::SequenceClassifier;
use graft_model::models::bert::{Inputs, Pooling};
use graft_peft::adapter::{self, SavedAdapter};
use graft_peft::loader::Registry;
use graft_peft::{Adapter, AttachContext, Method};
use graft_tokenizer::{EncodedBatch, LabelSet, Padding, Template, TextTokenizer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What an adapter folder needs besides PEFT's files to be used again: `graft_task.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub method: String,
    /// Local folder of the base model.
    pub model_dir: PathBuf,
    pub labels: Vec<String>,
    pub label_column: String,
    pub template: String,
    pub pooling: Pooling,
    pub max_len: usize,
    /// tokenizer.json when it is not in the model folder (a GGUF model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
}

pub const TASK_FILE: &str = "graft_task.json";

impl TaskSpec {
    /// The tokenizer: the one named, else the model folder's.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.tokenizer
            .clone()
            .unwrap_or_else(|| graft_tokenizer::tokenizer_in(&self.model_dir))
    }

    pub fn read(dir: &Path) -> Result<Self> {
        crate::config::read_task_file(dir, TASK_FILE, "task")
    }

    /// The task of the adapter folder `dir`: graft's task file, with `model` (when given)
    /// replacing the base model it names; or, for a folder Hugging Face PEFT wrote (no task
    /// file), a sequence-classification task on `model` with graft's defaults (labels `0`/`1`
    /// in column `label`, the default template, pooling and length) and the method whose
    /// `peft_type` the adapter names.
    pub fn locate(dir: &Path, model: Option<&Path>, registry: &Registry) -> Result<Self> {
        if dir.join(TASK_FILE).is_file() {
            let mut spec = Self::read(dir)?;
            if let Some(model) = model {
                spec.model_dir = model.to_path_buf();
                spec.tokenizer = None;
            }
            return Ok(spec);
        }
        if crate::thudm::is_checkpoint(dir) {
            return Err(Error::Adapter {
                path: dir.to_path_buf(),
                reason: "THUDM's P-tuning v2 output is a causal-LM prefix with no \
                         classification head; graft eval and predict read \
                         sequence-classification adapters: use it with graft generate, logits or \
                         eval-lm"
                    .into(),
            });
        }
        let config_path = dir.join(adapter::CONFIG_FILE);
        let config = adapter::read_config(dir)?;
        let field = |name: &str| config.get(name).and_then(|v| v.as_str());
        let peft_type = field("peft_type").ok_or_else(|| Error::Adapter {
            path: config_path.clone(),
            reason: "no `peft_type`: not an adapter folder PEFT or graft wrote".into(),
        })?;
        match field("task_type") {
            Some("SEQ_CLS") => {}
            other => {
                return Err(Error::Adapter {
                    path: config_path.clone(),
                    reason: format!(
                        "task_type {other:?}: graft eval and predict read sequence-classification (SEQ_CLS) adapters"
                    ),
                })
            }
        }
        let model = model.ok_or_else(|| Error::Adapter {
            path: dir.to_path_buf(),
            reason: format!(
                "no {TASK_FILE} (not written by graft): give the base model's folder with --model{}",
                field("base_model_name_or_path")
                    .map(|m| format!(" (PEFT recorded `{m}`)"))
                    .unwrap_or_default()
            ),
        })?;
        let method = registry.by_peft_type(peft_type)?.method.name();
        Ok(Self::from_config(
            &crate::TrainConfig::default(),
            method,
            model.to_path_buf(),
        ))
    }

    /// The task a training config describes, for `method` on the model in `model_dir`.
    pub fn from_config(config: &crate::TrainConfig, method: &str, model_dir: PathBuf) -> Self {
        Self {
            method: method.to_string(),
            model_dir,
            labels: config.data.labels.clone(),
            label_column: config.data.label_column.clone(),
            template: config.data.template.clone(),
            pooling: config.model.pooling,
            max_len: config.model.max_len,
            tokenizer: config.model.tokenizer.clone(),
        }
    }

    /// The same task with its model and tokenizer paths absolute: what an adapter folder
    /// records, so that it opens from any working directory.
    pub fn with_absolute_paths(&self) -> Result<Self> {
        Ok(Self {
            model_dir: crate::config::absolute(&self.model_dir)?,
            tokenizer: self
                .tokenizer
                .as_deref()
                .map(crate::config::absolute)
                .transpose()?,
            ..self.clone()
        })
    }
}

pub struct Classifier {
    pub model: Box<dyn SequenceClassifier>,
    pub adapter: Box<dyn Adapter>,
    pub tokenizer: TextTokenizer,
    pub template: Template,
    pub labels: LabelSet,
    pub spec: TaskSpec,
    pub peft_type: String,
    pub prompt_learning: bool,
    /// The method trains the whole model and saves it as a model folder.
    pub full_model: bool,
    /// The adapter's deltas are in the base weights: its hooks must not run again.
    merged: bool,
}

/// What a method sees of the model when it attaches: shapes, sites, base tensors, tokenizer.
pub(crate) struct Attachment {
    pub info: graft_model::ModelInfo,
    pub sites: Vec<graft_model::SiteInfo>,
    pub base_tensors: Vec<(String, Tensor)>,
    /// Keys of the base weights kept quantized (not among `base_tensors`).
    pub quantized: Vec<String>,
    pub tokenizer: TextTokenizer,
}

impl Attachment {
    fn new(model: &dyn SequenceClassifier, spec: &TaskSpec) -> Result<Self> {
        Ok(Self {
            info: model.info(),
            sites: model.sites(),
            base_tensors: model.named_tensors(),
            quantized: Vec::new(),
            tokenizer: TextTokenizer::from_file(
                &spec.tokenizer_path(),
                spec.max_len,
                Padding::Longest,
            )?,
        })
    }

    /// Runs `f` with the method's context; `dtype` is the base model's.
    pub fn with_context<T>(
        &self,
        device: &Device,
        dtype: DType,
        seed: u64,
        total_steps: usize,
        f: impl FnOnce(&AttachContext) -> graft_peft::Result<T>,
    ) -> graft_peft::Result<T> {
        let tokenize = |text: &str| -> graft_peft::Result<Vec<u32>> {
            self.tokenizer
                .encode(text)
                .map_err(|e| graft_peft::Error::Config {
                    method: "tokenizer".into(),
                    reason: e.to_string(),
                })
        };
        f(&AttachContext {
            info: &self.info,
            sites: &self.sites,
            // Trainable tensors stay f32 on a half-precision base (mixed precision).
            dtype: graft_model::ops::compute_dtype(dtype),
            device,
            seed,
            base_tensors: &self.base_tensors,
            quantized: &self.quantized,
            tokenize: &tokenize,
            total_steps,
        })
    }
}

impl Classifier {
    /// A fresh classifier for training: base model, new head, new adapter. `total_steps` is
    /// the number of optimizer steps planned (methods with budget schedules read it).
    pub fn create(
        spec: TaskSpec,
        method: &dyn Method,
        settings: &serde_json::Value,
        device: &Device,
        dtype: DType,
        seed: u64,
        total_steps: usize,
    ) -> Result<Self> {
        let labels = LabelSet::new(spec.labels.clone())?;
        let model = graft_model::classify::load(
            &spec.model_dir,
            labels.len(),
            spec.pooling,
            dtype,
            device,
            seed,
        )?;
        let attachment = Attachment::new(model.as_ref(), &spec)?;
        let adapter = attachment.with_context(device, dtype, seed, total_steps, |ctx| {
            method.create(settings, ctx)
        })?;
        Self::assemble(spec, method, model, adapter, labels, attachment.tokenizer)
    }

    /// A trained classifier from an adapter folder written by graft (PEFT's files plus
    /// graft's task file).
    pub fn open(dir: &Path, registry: &Registry, device: &Device) -> Result<Self> {
        Self::open_with_spec(dir, TaskSpec::read(dir)?, registry, device)
    }

    /// A classifier from PEFT's adapter files (or, for full fine-tuning, a model folder) with
    /// the task described by `spec`; `spec.method` picks the plugin.
    pub fn open_with_spec(
        dir: &Path,
        spec: TaskSpec,
        registry: &Registry,
        device: &Device,
    ) -> Result<Self> {
        let plugin = registry.get(&spec.method)?;
        let method = plugin.method.as_ref();
        let labels = LabelSet::new(spec.labels.clone())?;
        if method.saves_full_model() {
            // The folder is a complete model with its head.
            let model = graft_model::classify::load(
                dir,
                labels.len(),
                spec.pooling,
                DType::F32,
                device,
                0,
            )?;
            let attachment = Attachment::new(model.as_ref(), &spec)?;
            let adapter = attach_full(dir, method, &attachment, device)?;
            return Self::assemble(spec, method, model, adapter, labels, attachment.tokenizer);
        }
        let saved = read_saved(dir, method, &spec.method, device)?;
        let model = graft_model::classify::load(
            &spec.model_dir,
            labels.len(),
            spec.pooling,
            DType::F32,
            device,
            0,
        )?;
        let head = saved.head(model.head_name());
        if head.is_empty() {
            return Err(Error::Adapter {
                path: dir.join(adapter::WEIGHTS_FILE),
                reason: format!(
                    "the classification head (`base_model.model.{}.*`) is missing",
                    model.head_name()
                ),
            });
        }
        model.head().load_from(&head).map_err(|e| Error::Adapter {
            path: dir.join(adapter::WEIGHTS_FILE),
            reason: e.to_string(),
        })?;
        let attachment = Attachment::new(model.as_ref(), &spec)?;
        let adapter = attach_saved(dir, &saved, method, &attachment, device)?;
        Self::assemble(spec, method, model, adapter, labels, attachment.tokenizer)
    }

    fn assemble(
        spec: TaskSpec,
        method: &dyn Method,
        model: Box<dyn SequenceClassifier>,
        adapter: Box<dyn Adapter>,
        labels: LabelSet,
        tokenizer: TextTokenizer,
    ) -> Result<Self> {
        let template = Template::parse(&spec.template)?;
        Ok(Self {
            model,
            adapter,
            tokenizer,
            template,
            labels,
            peft_type: method.peft_type().to_string(),
            prompt_learning: method.is_prompt_learning(),
            full_model: method.saves_full_model(),
            merged: false,
            spec,
        })
    }

    /// The classifier head's tensors under their adapter-file keys.
    pub fn head_vars(&self) -> Vec<(String, Var)> {
        let prefix = adapter::head_prefix(self.prompt_learning, self.model.head_name());
        self.model
            .head()
            .vars()
            .into_iter()
            .map(|(name, var)| (format!("{prefix}{name}"), var))
            .collect()
    }

    /// Every tensor the optimizer updates, under its adapter-file key; the head last.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut vars = self.adapter.trainable();
        vars.extend(self.head_vars());
        vars
    }

    pub fn inputs(&self, batch: &EncodedBatch) -> Result<Inputs> {
        let device = self.model.head().device().clone();
        let shape = (batch.batch, batch.seq_len);
        Ok(Inputs {
            input_ids: Tensor::from_slice(&batch.input_ids, shape, &device)?,
            attention_mask: Tensor::from_slice(&batch.attention_mask, shape, &device)?,
            token_type_ids: Some(Tensor::from_slice(&batch.token_type_ids, shape, &device)?),
        })
    }

    /// Logits `[batch, labels]` of already rendered texts.
    pub fn logits(&self, texts: &[String]) -> Result<Tensor> {
        self.forward(&self.tokenizer.encode_batch(texts)?)
    }

    /// Logits of an encoded batch (`[batch, labels]`, or `[batch, tokens, labels]` for a token
    /// classifier), through [`Classifier::hooks`].
    pub fn forward(&self, batch: &EncodedBatch) -> Result<Tensor> {
        Ok(self.model.forward(&self.inputs(batch)?, self.hooks())?)
    }

    /// A micro-batch's value and gradients: its mean `loss` plus the method's extra term,
    /// weighed by its `share` of the step.
    pub fn weighed_grads(
        &self,
        loss: Tensor,
        share: crate::fit::Share,
    ) -> Result<(f64, candle_core::backprop::GradStore)> {
        let loss = match self.adapter.extra_loss()? {
            Some(extra) => (loss + extra)?,
            None => loss,
        };
        let loss = share.weigh(&loss)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((value, loss.backward()?))
    }

    /// The optimizer's groups: the method's tensors at `lr`, the head at `head_lr` (default
    /// `lr`).
    pub fn param_groups(&self, t: &crate::config::TrainSection) -> Vec<crate::optim::ParamGroup> {
        let vars = |named: Vec<(String, Var)>| named.into_iter().map(|(_, v)| v).collect();
        vec![
            crate::optim::ParamGroup {
                vars: vars(self.adapter.trainable()),
                lr: t.lr,
                weight_decay: t.weight_decay,
            },
            crate::optim::ParamGroup {
                vars: vars(self.head_vars()),
                lr: t.head_lr.unwrap_or(t.lr),
                weight_decay: t.weight_decay,
            },
        ]
    }

    /// The hooks a forward pass runs: the adapter's, unless it is merged into the weights.
    pub fn hooks(&self) -> &dyn graft_model::Hooks {
        if self.merged {
            &graft_model::NoHooks
        } else {
            self.adapter.as_ref()
        }
    }

    /// Saves the adapter folder: PEFT's two files (for full fine-tuning, a complete model
    /// folder) plus graft's task file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.full_model {
            self.save_model(dir)?;
        } else {
            self.save_adapter(dir)?;
        }
        crate::config::write_task_file(dir, TASK_FILE, &self.spec.with_absolute_paths()?)
    }

    /// A Hugging Face model folder (config.json, model.safetensors, tokenizer.json) of the
    /// model as it runs now: with full fine-tuning's tensors, or with a merged adapter.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        self.model
            .save(dir, self.labels.len(), self.hooks())
            .map_err(Error::from)?;
        copy_tokenizer(&self.spec.tokenizer_path(), dir)
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let config = adapter_config(
            &self.peft_type,
            &self.spec.model_dir,
            serde_json::json!({
                "task_type": match self.spec.pooling {
                    Pooling::Tokens => "TOKEN_CLS",
                    Pooling::Pooler | Pooling::Mean => "SEQ_CLS",
                },
                "modules_to_save": ["classifier", "score"],
            }),
            self.adapter.as_ref(),
        );
        let mut tensors = self.adapter.tensors()?;
        tensors.extend(
            self.head_vars()
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone())),
        );
        adapter::save(dir, &config, &tensors)?;
        Ok(())
    }

    /// Moves the adapter into the base weights (`merge`) or back out of them.
    pub fn set_merged(&mut self, merge: bool) -> Result<()> {
        // A fully fine-tuned model has no separate delta: it is already the merged model.
        if merge == self.merged || self.full_model {
            return Ok(());
        }
        apply_merge(
            self.adapter.as_ref(),
            &self.spec.method,
            merge,
            self.model.as_mut(),
        )?;
        self.merged = merge;
        Ok(())
    }
}

/// PEFT's files in `dir`, checked to be `method`'s (`name` as the task spec calls it).
pub(crate) fn read_saved(
    dir: &Path,
    method: &dyn Method,
    name: &str,
    device: &Device,
) -> Result<SavedAdapter> {
    let saved = SavedAdapter::read(dir, device)?;
    let peft_type = saved.peft_type().map_err(|e| Error::Adapter {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    if peft_type != method.peft_type() {
        return Err(Error::Adapter {
            path: dir.join(adapter::CONFIG_FILE),
            reason: format!(
                "peft_type is {peft_type}, but method `{name}` writes {}",
                method.peft_type()
            ),
        });
    }
    Ok(saved)
}

/// The adapter of a method that saves the whole model (`dir` holds it): no tensors of its own.
pub(crate) fn attach_full(
    dir: &Path,
    method: &dyn Method,
    attachment: &Attachment,
    device: &Device,
) -> Result<Box<dyn Adapter>> {
    attachment
        .with_context(device, DType::F32, 0, 0, |ctx| {
            method.load(&serde_json::json!({}), &Default::default(), ctx)
        })
        .map_err(|e| Error::Adapter {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The method's adapter from saved files; a tensor the method does not use is an error.
pub(crate) fn attach_saved(
    dir: &Path,
    saved: &SavedAdapter,
    method: &dyn Method,
    attachment: &Attachment,
    device: &Device,
) -> Result<Box<dyn Adapter>> {
    let adapter_error = |e: graft_peft::Error| Error::Adapter {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let method_tensors = saved.method_tensors();
    let adapter = attachment
        .with_context(device, DType::F32, 0, 0, |ctx| {
            method.load(&saved.config, &method_tensors, ctx)
        })
        .map_err(adapter_error)?;
    let used: std::collections::HashSet<String> = adapter
        .tensors()
        .map_err(adapter_error)?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut extra: Vec<String> = method_tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(adapter_error(graft_peft::Error::UnexpectedTensors {
            keys: extra,
        }));
    }
    Ok(adapter)
}

/// Adds the adapter's merge deltas to the base weights (`merge`) or subtracts them.
pub(crate) fn apply_merge(
    adapter: &dyn Adapter,
    method: &str,
    merge: bool,
    model: &mut dyn graft_model::layers::LinearSites,
) -> Result<()> {
    let sign = if merge { 1.0 } else { -1.0 };
    let deltas = adapter.merge_deltas()?.ok_or_else(|| {
        Error::Config(format!(
            "method `{method}` cannot be merged into the base weights"
        ))
    })?;
    for delta in deltas {
        let linear = model
            .linear_mut(&delta.site)
            .ok_or(graft_model::Error::UnknownSite(delta.site.clone()))?;
        let shift = |base: &Tensor, d: &Tensor| base + (d.to_dtype(base.dtype())? * sign)?;
        let weight = shift(linear.weight()?, &delta.weight)?;
        linear.set_weight(weight)?;
        if let Some(d) = &delta.bias {
            let bias = linear.bias().ok_or_else(|| {
                Error::Config(format!(
                    "{}: a bias delta for a site without bias",
                    delta.site
                ))
            })?;
            let bias = shift(bias, d)?;
            linear.set_bias(bias)?;
        }
    }
    Ok(())
}

/// Puts `tokenizer` into the model folder `dir` (unless it is already there).
pub(crate) fn copy_tokenizer(tokenizer: &Path, dir: &Path) -> Result<()> {
    let target = dir.join("tokenizer.json");
    if tokenizer != target {
        std::fs::copy(tokenizer, &target).map_err(io_error(tokenizer))?;
    }
    Ok(())
}

/// PEFT's adapter_config.json: the host's fields (`task`: the task type and what else the task
/// saves), then the method's own.
pub(crate) fn adapter_config(
    peft_type: &str,
    base_model: &Path,
    task: serde_json::Value,
    adapter: &dyn Adapter,
) -> serde_json::Value {
    let mut config = serde_json::json!({
        "peft_type": peft_type,
        "base_model_name_or_path": base_model.display().to_string(),
        "inference_mode": true,
        "revision": null,
    });
    for fields in [task, adapter.config_json()] {
        if let (Some(out), serde_json::Value::Object(fields)) = (config.as_object_mut(), fields) {
            out.extend(fields);
        }
    }
    config
}
