//! Where the checks find their models and data, and the small pieces every check builds on:
//! a classifier on MiniLM, real rows, decoder tasks on stories260K and ChatGLM.
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use graft_model::models::bert::Pooling;
use graft_peft::loader::{LoadedPlugin, Registry};
use graft_peft::Method;
use graft_tokenizer::{
    encode_causal, CausalBatch, ChatTemplate, LabelSet, PromptResponse, Template, DEFAULT_TEMPLATE,
};
use graft_trainer::config::Precision;
use graft_trainer::data::Dataset;
use graft_trainer::lm::{CausalLm, LmSpec};
use graft_trainer::task::{Classifier, TaskSpec};
use std::path::{Path, PathBuf};

/// The workspace root (this crate lives in `crates/graft-testkit`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Python with the reference package `package` (imported as `module`): `$GRAFT_PYTHON`, else
/// `python3` with the workspace's `target/<site>` on its path, where `cargo xtask test` installs
/// the package (pip `--target`) before it runs the tests. Panics, saying how to install it, if
/// neither has it.
pub fn python_with(site: &str, module: &str, package: &str) -> std::process::Command {
    if let Some(python) = std::env::var_os("GRAFT_PYTHON") {
        return std::process::Command::new(python);
    }
    let folder = workspace_root().join("target").join(site);
    assert!(
        folder.join(module).is_dir(),
        "no `{module}` in {}: `cargo xtask test` installs it, or run `python3 -m pip install \
         --target target/{site} {package}` in the workspace, or set GRAFT_PYTHON to a python \
         that has `{module}`",
        folder.display()
    );
    let mut python = std::process::Command::new("python3");
    python.env("PYTHONPATH", folder);
    python
}

/// all-MiniLM-L6-v2, fetched on first use.
pub fn minilm_dir() -> Result<PathBuf> {
    Ok(graft_model::zoo::MINILM.ensure(&mut |m| eprintln!("{m}"))?)
}

/// Real labelled rows: the challenge substitute beside the checkout, else the demo set.
pub fn real_data_path() -> PathBuf {
    let shared = workspace_root().join("../shared/data/abstracts/train.csv");
    if shared.is_file() {
        shared
    } else {
        workspace_root().join("data/demo.csv")
    }
}

pub fn spec(method: &str, max_len: usize) -> Result<TaskSpec> {
    Ok(TaskSpec {
        method: method.into(),
        model_dir: minilm_dir()?,
        labels: vec!["0".into(), "1".into()],
        label_column: "label".into(),
        template: DEFAULT_TEMPLATE.into(),
        pooling: Pooling::Pooler,
        max_len,
        tokenizer: None,
    })
}

/// `count` rows of the real data, alternating the two classes, as (texts, labels).
pub fn real_batch(count: usize) -> Result<(Vec<String>, Vec<usize>)> {
    let data = Dataset::read_csv(&real_data_path(), &["title", "abstract", "label"])?;
    let template = Template::parse(DEFAULT_TEMPLATE)?;
    let labels = data.labels("label", &LabelSet::new(vec!["0".into(), "1".into()])?)?;
    let texts = data.texts(&template)?;
    let mut picked = (Vec::new(), Vec::new());
    for class in [0, 1].iter().cycle().take(count) {
        let already = picked.1.iter().filter(|&&l| l == *class).count();
        let index = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == *class)
            .nth(already)
            .map(|(i, _)| i)
            .ok_or_else(|| Error::Config("not enough rows of each class".into()))?;
        picked.0.push(texts[index].clone());
        picked.1.push(*class);
    }
    Ok(picked)
}

/// Task loss (cross-entropy plus the method's extra term) of `texts`.
pub fn loss(classifier: &Classifier, texts: &[String], labels: &[usize]) -> Result<Tensor> {
    let device = classifier.model.head().device().clone();
    let targets = Tensor::from_iter(labels.iter().map(|&l| l as u32), &device)?;
    let logits = classifier.logits(texts)?;
    let mut loss = graft_model::loss::cross_entropy(&logits, &targets)?;
    if let Some(extra) = classifier.adapter.extra_loss()? {
        loss = (loss + extra)?;
    }
    Ok(loss)
}

pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Largest absolute difference between two tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    scalar(&(a - b)?.abs()?.flatten_all()?.max(0)?)
}

/// A fresh classifier with `method` on MiniLM, attached for a training run of 100 steps.
pub fn classifier(
    method: &dyn Method,
    settings: &serde_json::Value,
    dtype: DType,
    max_len: usize,
    seed: u64,
) -> Result<Classifier> {
    Ok(Classifier::create(
        spec(method.name(), max_len)?,
        method,
        settings,
        &Device::Cpu,
        dtype,
        seed,
        100,
    )?)
}

/// The error of attaching `method` with `settings` to a classifier (f32, 16 tokens), which must
/// refuse them; panics if it accepts them.
pub fn attach_error(method: &dyn Method, settings: &serde_json::Value) -> String {
    match classifier(method, settings, DType::F32, 16, 1) {
        Ok(_) => panic!("{} accepted {settings}", method.name()),
        Err(e) => e.to_string(),
    }
}

/// The keys of named tensors (an adapter's `trainable()` or `tensors()`), in order.
pub fn keys<T>(named: &[(String, T)]) -> Vec<String> {
    named.iter().map(|(k, _)| k.clone()).collect()
}

/// Sets every trainable tensor whose key `select` accepts to normal(0, `std`) values: methods
/// that start a factor at zero (LoRA's B, AdaLoRA's E) leave the other factor without gradient
/// until it moves, which a gradient check must not mistake for agreement.
pub fn randomize(
    classifier: &Classifier,
    select: impl Fn(&str) -> bool,
    std: f64,
    seed: u64,
) -> Result<()> {
    randomize_vars(&classifier.trainable(), select, std, seed)
}

/// [`randomize`] for any set of trainable tensors.
pub fn randomize_vars(
    trainable: &[(String, Var)],
    select: impl Fn(&str) -> bool,
    std: f64,
    seed: u64,
) -> Result<()> {
    let mut rng = graft_model::init::seeded_rng(seed);
    for (name, var) in trainable {
        if select(name) {
            let dtype = var.dtype();
            let device = var.device().clone();
            var.set(&graft_model::init::normal(
                &mut rng,
                var.dims(),
                std,
                dtype,
                &device,
            )?)?;
        }
    }
    Ok(())
}

/// A registry holding one statically linked method.
pub fn registry_of(method: Box<dyn Method>) -> Result<Registry> {
    let mut registry = Registry::default();
    registry.add(LoadedPlugin::statically_linked(method))?;
    Ok(registry)
}

/// A fixture folder of `../shared/fixtures` (adapters written by Hugging Face PEFT).
pub fn fixture_dir(name: &str) -> PathBuf {
    workspace_root().join("../shared/fixtures").join(name)
}

/// The decoder families every method is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// stories260K: a real, trained Llama with grouped-query attention.
    Llama,
    /// A small ChatGLM2-shaped model with random weights (no small pretrained one exists).
    ChatGlm,
    /// A small Llama with random weights whose projections all have rows a multiple of 256
    /// wide, so that q4_k keeps every one (the untied head too) in its own super-blocks.
    QuantizableLlama,
}

/// Writes [`Family::QuantizableLlama`]'s model (stories260K's vocabulary) to `dir`.
fn write_quantizable_llama(dir: &Path) -> Result<()> {
    let config_json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": false,
    });
    let config: graft_model::models::llama::Config = serde_json::from_value(config_json.clone())
        .map_err(|e| Error::Check(format!("quantizable Llama config: {e}")))?;
    Ok(graft_model::models::llama::plan(&config)?.write_random(dir, &config_json, 5)?)
}

/// stories260K's folder beside the checkout.
pub fn stories260k_dir() -> PathBuf {
    workspace_root().join("../shared/models/stories260K")
}

/// A causal-LM task on a model of `family` with stories260K's tokenizer; the ChatGLM model is
/// written under `scratch`.
pub fn lm_spec(method: &str, family: Family, scratch: &Path) -> Result<LmSpec> {
    let tokenizer = stories260k_dir().join("tokenizer.json");
    let model = match family {
        Family::Llama => stories260k_dir(),
        Family::ChatGlm => {
            let dir = scratch.join("chatglm");
            graft_model::models::chatglm::write_random(
                &dir,
                &graft_model::models::chatglm::Config::tiny(512),
                3,
            )?;
            dir
        }
        Family::QuantizableLlama => {
            let dir = scratch.join("quantizable-llama");
            write_quantizable_llama(&dir)?;
            dir
        }
    };
    Ok(LmSpec {
        method: method.into(),
        model,
        tokenizer,
        template: ChatTemplate::parse("plain")?,
        max_len: 48,
        dtype: Precision::F32,
        quantize: None,
        prompt: None,
        random_init: None,
        pad_to_max_len: false,
    })
}

/// Short prompt/response pairs in stories260K's vocabulary.
pub fn story_pairs(count: usize) -> Vec<PromptResponse> {
    let pairs = [
        ("Once upon a time, there was a", " little dog named Max."),
        ("Lily liked to play in the", " park with her ball."),
        ("The sun was", " big and warm."),
        ("Tom saw a bird in the", " tree. It sang a song."),
    ];
    pairs
        .iter()
        .cycle()
        .take(count)
        .map(|(p, r)| PromptResponse {
            prompt: p.to_string(),
            response: r.to_string(),
        })
        .collect()
}

/// A train-lm config on the model, tokenizer, template and length of `spec`, training its method
/// with `settings` on `pairs` (written as JSONL to `scratch/pairs.jsonl`) with `train`'s settings:
/// what `graft train-lm` reads, resolved, for library-level runs of the one training loop.
pub fn lm_config(
    spec: &LmSpec,
    settings: &serde_json::Value,
    pairs: &[PromptResponse],
    train: graft_trainer::config::TrainSection,
    scratch: &Path,
) -> Result<graft_trainer::lm_train::LmConfig> {
    use graft_trainer::lm_train::{LmConfig, LmDataSection, LmModelSection};
    let data = scratch.join("pairs.jsonl");
    let lines: Vec<String> = pairs
        .iter()
        .map(|p| serde_json::json!({ "prompt": p.prompt, "response": p.response }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n"))
        .map_err(|e| Error::Check(format!("{}: {e}", data.display())))?;
    let mut method = toml::Table::try_from(settings)
        .map_err(|e| Error::Check(format!("method settings {settings}: {e}")))?;
    method.insert("name".into(), toml::Value::String(spec.method.clone()));
    Ok(LmConfig {
        model: LmModelSection {
            path: Some(spec.model.clone()),
            tokenizer: Some(spec.tokenizer.clone()),
            template: spec.template.name().to_string(),
            max_len: spec.max_len,
            dtype: spec.dtype,
            quantize: spec.quantize,
            ..LmModelSection::default()
        },
        data: LmDataSection {
            train: Some(data),
            ..LmDataSection::default()
        },
        train,
        method,
        eval: Default::default(),
    })
}

pub(crate) fn story_batch(lm: &CausalLm, count: usize) -> Result<CausalBatch> {
    Ok(encode_causal(
        &lm.tokenizer,
        &lm.spec.template,
        &story_pairs(count),
        lm.spec.max_len,
    )?)
}

/// A temporary folder for a check's files (removed when dropped).
pub(crate) fn scratch_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| Error::Check(format!("temporary folder: {e}")))
}
