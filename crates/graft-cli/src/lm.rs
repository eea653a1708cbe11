//! `graft train-lm` and `graft eval-lm`: causal-LM fine-tuning of a decoder, and scoring it.
use crate::models::{registry, resolve_model_file, PluginArgs};
use anyhow::{Context, Result};
use graft_trainer::lm::{CausalLm, OpenOptions};
use graft_trainer::lm_train::{self, LmConfig, LmData, LmOutcome};
use std::path::Path;

pub fn chat_template(name: &str, system: Option<String>) -> Result<graft_tokenizer::ChatTemplate> {
    let template = graft_tokenizer::ChatTemplate::parse(name)?;
    Ok(match system {
        Some(system) => template.with_system(system)?,
        None => template,
    })
}

pub fn train_lm(config: LmConfig, out: &Path, plugins: &PluginArgs) -> Result<()> {
    // An unknown method is reported before any model is fetched or data read.
    let registry = registry(plugins)?;
    registry.get(config.method_name()?)?;
    let model = match &config.model.path {
        Some(shape) if config.model.random_init => shape.clone(),
        Some(path) => resolve_model_file(path)?,
        None => resolve_model_file(Path::new(&config.model.name))?,
    };
    let mut resolved = lm_train::resolved(&config, &model)?;
    if config.model.random_init {
        if let Some(note) = lm_train::fit_targets_to_shape(&mut resolved)? {
            eprintln!("{note}");
        }
    }
    let outcome = lm_train::train(&resolved, &registry, out)?;
    report(&outcome);
    Ok(())
}

/// `graft train-lm --resume DIR`: continues the run from its newest checkpoint with the config
/// it recorded; plugins come from `--plugin-dir` and the built-in directories, never from the
/// run folder.
pub fn resume_lm(dir: &Path, plugins: &PluginArgs) -> Result<()> {
    let outcome = lm_train::resume(dir, &registry(plugins)?)
        .with_context(|| format!("resuming the run in {}", dir.display()))?;
    report(&outcome);
    Ok(())
}

fn report(outcome: &LmOutcome) {
    println!("adapter written to {}", outcome.run_dir.display());
    if let Some(best) = &outcome.best {
        println!("best evaluation at step {}: {}", best.step, best.summary);
    }
}

/// `graft eval-lm`: the verbalizer evaluation of an adapter trained by train-lm, on the
/// held-out split its config names.
pub fn eval_lm(adapter: &Path, config_path: &Path, out: &Path, plugins: &PluginArgs) -> Result<()> {
    let config = LmConfig::from_file(config_path)?;
    if config.eval.labels.is_empty() {
        anyhow::bail!(
            "{}: no [eval] labels (the label words to score): nothing to score",
            config_path.display()
        );
    }
    let data = LmData::load(&config)?;
    if data.validation_classes.is_empty() {
        anyhow::bail!(
            "{}: no rows are held out with a class (data.val_fraction is 0, or the data is JSONL): nothing to score",
            config_path.display()
        );
    }
    // THUDM's P-tuning v2 output names no base: the config's model is it.
    let options = if graft_trainer::thudm::is_checkpoint(adapter) {
        OpenOptions {
            model: config.model.path.clone(),
            tokenizer: config.model.tokenizer.clone(),
            template: Some(config.template()?),
            dtype: Some(config.model.dtype),
            ..OpenOptions::default()
        }
    } else {
        OpenOptions::default()
    };
    let device = graft_model::default_device()?;
    let lm = open_lm(adapter, plugins, &device, &options)?;
    let (eval, mut report) = lm_train::score_held_out(&lm, &data, &config.eval)?;
    let seconds = report["seconds"].as_f64().unwrap_or_default();
    report["peak_rss_mb"] = serde_json::json!(graft_trainer::fit::peak_rss_mb());
    report["matmul"] = serde_json::json!(graft_model::ops::matmul_path());
    std::fs::write(out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "validation ({} rows, verbalizer {:?}, {seconds:.0} s): accuracy {:.4}  precision {:.4}  recall {:.4}  F1 {:.4}",
        eval.count,
        config.eval.labels,
        eval.accuracy,
        eval.precision,
        eval.recall,
        eval.f1
    );
    Ok(())
}

/// The causal LM of an adapter folder, with `options` in place of what the folder records.
pub fn open_lm(
    adapter: &Path,
    plugins: &PluginArgs,
    device: &candle_core::Device,
    options: &OpenOptions,
) -> Result<CausalLm> {
    let options = OpenOptions {
        model: (options.model.as_deref())
            .map(resolve_model_file)
            .transpose()?,
        ..options.clone()
    };
    CausalLm::open_with(adapter, &registry(plugins)?, device, &options)
        .with_context(|| format!("loading the adapter in {}", adapter.display()))
}
