//! `graft train-lm`: causal-LM fine-tuning of a decoder, and what it reports.
use crate::models::{known_models, model_file, registry, PluginArgs};
use anyhow::{Context, Result};
use graft_trainer::lm::{CausalLm, LmConfig, LmSpec};
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
    let plugin = registry.get(config.method_name()?)?;
    let model = match &config.model.path {
        Some(path) => model_file(path)?,
        None => {
            let known = graft_model::zoo::find_known(&config.model.name).with_context(|| {
                format!(
                    "model.name `{}` is not a model graft can fetch (known: {}); set model.path",
                    config.model.name,
                    known_models()
                )
            })?;
            model_file(&known.ensure(&mut |m| eprintln!("{m}"))?)?
        }
    };
    let tokenizer = config
        .model
        .tokenizer
        .clone()
        .unwrap_or_else(|| LmSpec::default_tokenizer(&model));
    let mut data = graft_trainer::lm::LmData::load(&config)?;
    let pairs = std::mem::take(&mut data.train);
    let spec = LmSpec {
        method: config.method_name()?.to_string(),
        model,
        tokenizer,
        template: config.template()?,
        max_len: config.model.max_len,
        dtype: config.model.dtype,
        quantize: config.model.quantize,
        prompt: config.data.prompt_source(),
    };
    let device = graft_model::default_device()?;
    // What the process holds before the model (binary, libraries, the data): `graft inspect`
    // estimates what comes on top.
    let rss_before_model = graft_trainer::train::rss_mb();
    let mut lm = CausalLm::create(
        spec,
        plugin.method.as_ref(),
        &config.method_settings(),
        &device,
        config.train.seed,
        config.train.max_steps,
    )?;
    let trainable: usize = lm.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "{} on {} in {}: {trainable} trainable values, {} pairs, {} steps",
        lm.spec.method,
        lm.spec.model.display(),
        lm.spec.dtype,
        pairs.len(),
        config.train.max_steps
    );
    if let Some(family) = lm.spec.quantize {
        eprintln!("{}", quantized_summary(family, &lm.model));
    }
    let log_every = config.train.log_every.max(1);
    let mut steps = Vec::new();
    let checkpointing = config.model.checkpointing;
    graft_trainer::lm::train_lm(
        &mut lm,
        &pairs,
        &config.train,
        checkpointing,
        Some(out),
        &mut |s| {
            if s.step % log_every == 0 || s.step == 1 {
                eprintln!("step {:>4}  loss {:.4}  {:.2} s", s.step, s.loss, s.seconds);
            }
            steps.push(s.clone());
        },
    )?;
    lm.save(out)
        .with_context(|| format!("writing the adapter to {}", out.display()))?;
    eprintln!("adapter written to {}", out.display());
    write_lm_summary(
        out,
        &lm.spec.method,
        trainable,
        &steps,
        rss_before_model,
        &data.train_rows,
    )?;
    if !data.validation.is_empty() && !config.eval.labels.is_empty() {
        score(&lm, &data, &config, &out.join("eval.json"))?;
    }
    Ok(())
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
    let data = graft_trainer::lm::LmData::load(&config)?;
    if data.validation.is_empty() {
        anyhow::bail!(
            "{}: no rows are held out (data.val_fraction is 0, or the data is JSONL): nothing to score",
            config_path.display()
        );
    }
    let device = graft_model::default_device()?;
    let lm = CausalLm::open(adapter, &registry(plugins)?, &device)
        .with_context(|| format!("loading the adapter in {}", adapter.display()))?;
    score(&lm, &data, &config, out)
}

/// Scores the held-out rows with the verbalizer and writes `path`: the metrics, the rows (their
/// indexes in the data file), the time and rows per second, and the process's peak RSS.
fn score(
    lm: &CausalLm,
    data: &graft_trainer::lm::LmData,
    config: &LmConfig,
    path: &Path,
) -> Result<()> {
    let started = std::time::Instant::now();
    let eval = graft_trainer::lm::evaluate_verbalizer(
        lm,
        &data.validation,
        &config.eval.labels,
        config.eval.batch_size,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let mut report = serde_json::to_value(&eval)?;
    report["rows"] = serde_json::json!(data.validation_rows);
    report["batch_size"] = serde_json::json!(config.eval.batch_size);
    report["seconds"] = serde_json::json!(seconds);
    report["rows_per_s"] = serde_json::json!(eval.count as f64 / seconds.max(1e-9));
    report["peak_rss_mb"] = serde_json::json!(graft_trainer::train::peak_rss_mb());
    report["matmul"] = serde_json::json!(graft_model::ops::matmul_path());
    std::fs::write(path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
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

/// train.json: the run's speed, memory and losses (what `cargo xtask bench --model` reads).
pub fn write_lm_summary(
    out: &Path,
    method: &str,
    trainable: usize,
    steps: &[graft_trainer::lm::LmStep],
    rss_before_model: Option<f64>,
    train_rows: &[usize],
) -> Result<()> {
    use graft_trainer::train::{median_after_warmup, peak_rss_mb};
    let seconds: Vec<f64> = steps.iter().map(|s| s.seconds).collect();
    let tokenize: Vec<f64> = steps.iter().map(|s| s.tokenize_seconds).collect();
    let tokens: usize = steps.iter().map(|s| s.tokens).sum();
    let step_median = median_after_warmup(&seconds);
    let summary = serde_json::json!({
        "method": method,
        "trainable_params": trainable,
        "steps": steps.len(),
        "step_seconds_median": step_median,
        "tokenize_seconds_median": median_after_warmup(&tokenize),
        // Steady state: the mean tokens of a step over the median step.
        "train_tokens_per_s": tokens as f64 / steps.len().max(1) as f64 / step_median.max(1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_model_mb": rss_before_model,
        "longest_step_tokens": steps.iter().map(|s| s.tokens).max(),
        "losses": steps.iter().map(|s| s.loss).collect::<Vec<_>>(),
        // Each step's batch as indexes of rows in the data file.
        "batch_rows": steps
            .iter()
            .map(|s| s.pairs.iter().map(|&p| train_rows[p]).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        "matmul": graft_model::ops::matmul_path(),
    });
    let path = out.join("train.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One line on what a quantized base holds: how many projection weights in which block
/// format, their size, and the dense projections left (rows no block divides).
pub fn quantized_summary(
    family: graft_model::quant::Quantization,
    model: &graft_model::decoder::Decoder,
) -> String {
    let quantized = model.quantized();
    let mut formats = std::collections::BTreeMap::new();
    for (_, blocks) in &quantized {
        *formats
            .entry(graft_model::quant::format_name(blocks.format()))
            .or_insert(0usize) += 1;
    }
    let bytes: usize = quantized.iter().map(|(_, b)| b.size_in_bytes()).sum();
    let dense = model.sites().len() - quantized.len();
    format!(
        "base quantized to {family}: {} projection weights ({}), {:.1} MiB; {dense} left in {} (rows no block divides)",
        quantized.len(),
        formats
            .iter()
            .map(|(f, n)| format!("{n} {f}"))
            .collect::<Vec<_>>()
            .join(", "),
        bytes as f64 / (1u64 << 20) as f64,
        model.dtype().as_str()
    )
}
