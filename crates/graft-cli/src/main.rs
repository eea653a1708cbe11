//! `graft`: fine-tune transformer models with PEFT methods loaded as plugins.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use graft_model::models::bert::Pooling;
use graft_peft::loader::{search_dirs, Registry};
use graft_trainer::data::Dataset;
use graft_trainer::lm_train::LmConfig;
use graft_trainer::tag_train;
use graft_trainer::task::{Classifier, TaskSpec};
use graft_trainer::train::{self, Examples};
use graft_trainer::TrainConfig;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod decoder;
mod export;
mod keywords;
mod lm;
mod models;

use graft_hub::Files;
use lm::{resume_lm, train_lm};
use models::{default_data, model_dir, registry, registry_with, resolve_model, PluginArgs};

#[derive(Parser)]
#[command(
    name = "graft",
    version,
    about = "Parameter-efficient fine-tuning of transformer models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a method on a labelled CSV and write a run directory.
    Train {
        /// Method plugin name (lora, ...); overrides [method] name of the config.
        #[arg(long)]
        method: Option<String>,
        /// TOML config (see configs/).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Model folder (config.json, model.safetensors, tokenizer.json), alias (minilm) or
        /// hub id (owner/name[@revision]; a local path of that name wins).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Labelled CSV (uuid,title,author,abstract,Keywords,label).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run directory (default: a fresh one under runs/).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        epochs: Option<usize>,
        #[arg(long)]
        max_steps: Option<usize>,
        #[arg(long)]
        seed: Option<u64>,
        /// Evaluate every N steps (0: only at epoch ends and at the end).
        #[arg(long)]
        eval_every: Option<usize>,
        /// Continue the run in this directory from its newest checkpoint, with the config it
        /// started with (no other training option may be given).
        #[arg(long, conflicts_with_all = ["method", "config", "model", "data", "out", "epochs", "max_steps", "seed", "eval_every"])]
        resume: Option<PathBuf>,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Evaluate an adapter on a labelled CSV.
    Eval {
        /// An adapter folder written by graft, or by Hugging Face PEFT (then give --model).
        #[arg(long)]
        adapter: PathBuf,
        /// The base model: a folder, alias or hub id (default: the folder the adapter's
        /// graft_task.json names).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        /// Write the evaluation as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Predict labels for a CSV; writes uuid,label.
    Predict {
        /// An adapter folder written by graft, or by Hugging Face PEFT (then give --model).
        #[arg(long)]
        adapter: PathBuf,
        /// The base model: a folder, alias or hub id (default: the folder the adapter's
        /// graft_task.json names).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Write the challenge's submission columns uuid,Keywords,label (the data needs
        /// title and abstract columns for the keywords).
        #[arg(long)]
        submission: bool,
        /// With --submission: keywords from the generative extractor of this `graft train-lm`
        /// keyword adapter (default: the statistical baseline, fitted on the file's own titles
        /// and abstracts).
        #[arg(long, requires = "submission")]
        keywords_adapter: Option<PathBuf>,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Merge a mergeable adapter (LoRA) into the base weights and write a full model.
    Merge {
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Write a decoder (an adapter merged into it, or the base alone) as a GGUF file that
    /// llama.cpp and Ollama run: Llama-family models, tokenizer and chat template included.
    Export(export::ExportArgs),
    /// Score a keyword extractor against gold keywords on the report rows of a CSV (every
    /// fifth row from the first; never trained on): exact-match and partial-match F1.
    KeywordsEval {
        #[command(flatten)]
        args: keywords::EvalArgs,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Fine-tune a decoder on prompt/response pairs (causal LM, loss on the responses) and
    /// write the adapter folder.
    TrainLm {
        /// TOML config (see configs/lm/knowledge-adalora.toml).
        #[arg(long, required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Run folder to write: the config, metrics, checkpoints and the adapter (the best by
        /// evaluation, else the last).
        #[arg(long, required_unless_present = "resume")]
        out: Option<PathBuf>,
        /// Continue the run in this folder from its newest checkpoint, with its recorded
        /// config (no other option applies).
        #[arg(long, conflicts_with_all = ["config", "out", "max_steps", "batch_size", "dtype", "checkpointing", "quantize", "random_init"])]
        resume: Option<PathBuf>,
        /// Overrides train.max_steps.
        #[arg(long)]
        max_steps: Option<usize>,
        /// Overrides train.batch_size.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Overrides model.dtype: f32, bf16 or f16 for the frozen base and the activations
        /// (trainable tensors and the optimizer's state stay f32).
        #[arg(long)]
        dtype: Option<graft_trainer::config::Precision>,
        /// Overrides model.checkpointing: recompute each layer in the backward pass.
        #[arg(long)]
        checkpointing: bool,
        /// Overrides model.quantize: q8_0 or q4_k, the frozen projection weights kept
        /// quantized (QLoRA-style).
        #[arg(long)]
        quantize: Option<graft_model::quant::Quantization>,
        /// Build the model from this config.json (e.g. configs/shapes/chatglm2-6b.json) with
        /// random weights seeded by train.seed, instead of the config's model: a model's real
        /// size without its weights. Data and tokenizer come from --config.
        #[arg(long)]
        random_init: Option<PathBuf>,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Score the held-out rows of a train-lm config with an adapter it trained (verbalizer
    /// classification), and write the metrics, time and peak RSS as JSON.
    EvalLm {
        /// An adapter folder written by `graft train-lm`.
        #[arg(long)]
        adapter: PathBuf,
        /// The train-lm config whose data, split and [eval] labels to use.
        #[arg(long)]
        config: PathBuf,
        /// JSON file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Write the next-token logits after a prompt (f32, JSON) of an adapter trained by
    /// train-lm (or THUDM's P-tuning v2 output, with --model), or of a base model alone: for
    /// comparing devices and dtypes (`cargo xtask gpu-kit`) and implementations.
    Logits(decoder::LogitsArgs),
    /// Generate text with a decoder, with or without an adapter.
    Generate(decoder::GenerateArgs),
    /// Write a decoder with random weights, built from a config.json as `train-lm
    /// --random-init` builds it, as a Hugging Face folder (config.json, model.safetensors):
    /// one set of weights that graft and another framework can both read.
    RandomModel(decoder::RandomModelArgs),
    /// Size a decoder and LoRA on it from the config alone (no weights read): parameters,
    /// trainable values, and the memory a training step needs.
    Inspect {
        /// A model folder, its config.json, a .gguf file, an alias or a hub id (only its
        /// config.json is fetched).
        model: PathBuf,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        r: usize,
        /// LoRA target modules (repeatable; default: PEFT's for the architecture).
        #[arg(long = "target")]
        targets: Vec<String>,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// f32, bf16 or f16: the dtype the base weights and activations are kept in, as
        /// train-lm's --dtype (trainable tensors and AdamW's state are f32 in each).
        #[arg(long, default_value = "f32")]
        dtype: graft_trainer::config::Precision,
        /// Gradient checkpointing, as train-lm's --checkpointing.
        #[arg(long)]
        checkpointing: bool,
        /// q8_0 or q4_k: the projection weights kept quantized, as train-lm's --quantize.
        #[arg(long)]
        quantize: Option<graft_model::quant::Quantization>,
        /// Tokens of each sequence that take a loss (a response's; default: all of them).
        #[arg(long)]
        labelled: Option<usize>,
        /// cpu or cuda: where the step runs (a quantized product on the GPU holds a whole
        /// dequantized weight); default: this build's device.
        #[arg(long, value_parser = ["cpu", "cuda"])]
        device: Option<String>,
        /// A key/value prefix of this many positions trains instead of LoRA (prefix tuning,
        /// P-tuning v2's pre_seq_len).
        #[arg(long)]
        prefix: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a model, a known one (minilm, smollm2) into graft's cache or a hub id
    /// (owner/name[@revision]) into the Hugging Face cache, and print its folder.
    FetchModel { name: PathBuf },
    /// Put graft's own copy of OpenBLAS in its cache (PyPI's scipy-openblas32, pinned by
    /// version and hash) and print its path and what the products will run on.
    FetchBlas,
    /// List the method plugins found, with versions, paths and ABI strings.
    Plugins {
        #[command(flatten)]
        plugins: PluginArgs,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            method,
            config,
            model,
            data,
            out,
            epochs,
            max_steps,
            seed,
            eval_every,
            resume,
            plugins,
        } => {
            print_matmul_notice();
            if let Some(dir) = resume {
                // A run folder is data: the plugin directories its config names are not
                // searched (they are for the command that started the run). `--plugin-dir`
                // and the built-in directories are.
                let registry = registry(&plugins)?;
                let context = || format!("resuming the run in {}", dir.display());
                let config = TrainConfig::from_file(&dir.join(graft_trainer::run::RunDir::CONFIG))
                    .with_context(context)?;
                if config.model.pooling == Pooling::Tokens {
                    let outcome = tag_train::resume(&dir, &registry).with_context(context)?;
                    report_tag_outcome(&outcome);
                } else {
                    let outcome = train::resume(&dir, &registry).with_context(context)?;
                    report_outcome(&outcome);
                }
                return Ok(());
            }
            let mut cfg = match &config {
                Some(path) => TrainConfig::from_file(path)?,
                // Without a config, the method's own recipe (what `cargo xtask train` runs).
                None => {
                    let name = match &method {
                        Some(name) => name.clone(),
                        None => TrainConfig::default().method_name()?.to_string(),
                    };
                    let recommended = registry(&plugins)?.get(&name)?.method.recommended_config();
                    match recommended {
                        Some(text) => TrainConfig::from_toml(&text)
                            .with_context(|| format!("the {name} plugin's recommended config"))?,
                        None => TrainConfig::default(),
                    }
                }
            };
            if let Some(method) = method {
                cfg.method
                    .insert("name".into(), toml::Value::String(method));
            }
            if let Some(epochs) = epochs {
                cfg.train.epochs = epochs;
                cfg.train.max_steps = 0;
            }
            if let Some(steps) = max_steps {
                cfg.train.max_steps = steps;
            }
            if let Some(seed) = seed {
                cfg.train.seed = seed;
            }
            if let Some(every) = eval_every {
                cfg.train.eval_every = every;
            }
            cfg.validate()?;
            let method_name = cfg.method_name()?.to_string();
            let registry = registry_with(&plugins, &cfg.plugins.dirs)?;
            // An unknown method is reported before any model is fetched or data read.
            registry.get(&method_name)?;
            let data = match data.or_else(|| cfg.data.train.clone()) {
                Some(path) => path,
                None => default_data()?,
            };
            let model = model_dir(&cfg, model)?;
            let out = out.unwrap_or_else(|| graft_trainer::run::default_run_dir(&method_name));
            if cfg.model.pooling == Pooling::Tokens {
                let outcome = tag_train::train(&cfg, &registry, &model, &data, &out)?;
                report_tag_outcome(&outcome);
            } else {
                let outcome = train::train(&cfg, &registry, &model, &data, &out)?;
                report_outcome(&outcome);
            }
        }
        Command::Eval {
            adapter,
            model,
            data,
            out,
            plugins,
        } => {
            let registry = registry(&plugins)?;
            let classifier = open(&adapter, model.as_deref(), &registry)?;
            let examples = Examples::from_file(&data, &classifier.spec)?;
            let (_, evaluation, _) = train::evaluate_examples(&classifier, &examples, 32)?;
            let text = serde_json::to_string_pretty(&evaluation)?;
            match out {
                Some(path) => std::fs::write(&path, &text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{text}"),
            }
            eprintln!(
                "{}: accuracy {:.4}  precision {:.4}  recall {:.4}  F1 {:.4} on {} rows",
                data.display(),
                evaluation.accuracy,
                evaluation.precision,
                evaluation.recall,
                evaluation.f1,
                evaluation.count
            );
        }
        Command::Predict {
            adapter,
            model,
            data,
            out,
            submission,
            keywords_adapter,
            plugins,
        } => {
            let registry = registry(&plugins)?;
            let classifier = open(&adapter, model.as_deref(), &registry)?;
            let mut columns = classifier.template.columns();
            if submission {
                columns.extend(["title", "abstract"]);
            }
            let dataset = Dataset::read(&data, &columns)?;
            let texts = dataset.texts(&classifier.template)?;
            let keywords = if submission {
                keywords::submission_keywords(&dataset, keywords_adapter.as_deref(), &registry)?
            } else {
                Vec::new()
            };
            let mut rows = String::from(if submission {
                "uuid,Keywords,label\n"
            } else {
                "uuid,label\n"
            });
            let mut index = 0;
            for (records, chunk) in dataset.records.chunks(32).zip(texts.chunks(32)) {
                let logits = graft_model::ops::without_grad(|| classifier.logits(chunk))?;
                for (record, class) in records
                    .iter()
                    .zip(graft_model::models::bert::argmax(&logits)?)
                {
                    let label = classifier.labels.labels()[class as usize].as_str();
                    let uuid = csv_field(&record.uuid);
                    if submission {
                        let found = csv_field(&keywords[index]);
                        rows.push_str(&format!("{uuid},{found},{}\n", csv_field(label)));
                        index += 1;
                    } else {
                        rows.push_str(&format!("{uuid},{}\n", csv_field(label)));
                    }
                }
            }
            graft_model::formats::safetensors::write_atomic(&out, rows.as_bytes())
                .with_context(|| format!("writing predictions to {}", out.display()))?;
            eprintln!(
                "wrote {} predictions to {}",
                dataset.records.len(),
                out.display()
            );
        }
        Command::Merge {
            adapter,
            out,
            plugins,
        } => {
            if out.join("model.safetensors").exists() {
                bail!(
                    "{} already holds a model; choose another --out",
                    out.display()
                );
            }
            let registry = registry(&plugins)?;
            let mut classifier = open(&adapter, None, &registry)?;
            classifier.set_merged(true)?;
            classifier
                .save_model(&out)
                .with_context(|| format!("writing the merged model to {}", out.display()))?;
            eprintln!("merged model written to {}", out.display());
        }
        Command::Export(args) => export::export(args)?,
        Command::KeywordsEval { args, plugins } => keywords::eval(args, &registry(&plugins)?)?,
        Command::TrainLm {
            config,
            out,
            resume,
            max_steps,
            batch_size,
            dtype,
            checkpointing,
            quantize,
            random_init,
            plugins,
        } => {
            print_matmul_notice();
            if let Some(dir) = resume {
                return resume_lm(&dir, &plugins);
            }
            let (Some(config), Some(out)) = (config, out) else {
                anyhow::bail!("train-lm needs --config and --out (or --resume RUN_DIR)");
            };
            let mut config = LmConfig::from_file(&config)?;
            if let Some(steps) = max_steps {
                config.train.max_steps = steps;
            }
            if let Some(batch) = batch_size {
                config.train.batch_size = batch;
            }
            if let Some(dtype) = dtype {
                config.model.dtype = dtype;
            }
            config.model.checkpointing |= checkpointing;
            if quantize.is_some() {
                config.model.quantize = quantize;
            }
            if let Some(shape) = random_init {
                config.model.path = Some(shape);
                config.model.random_init = true;
            }
            train_lm(config, &out, &plugins)?
        }
        Command::Generate(args) => decoder::generate(args)?,
        Command::EvalLm {
            adapter,
            config,
            out,
            plugins,
        } => lm::eval_lm(&adapter, &config, &out, &plugins)?,
        Command::Logits(args) => decoder::logits(args)?,
        Command::RandomModel(args) => decoder::random_model(args)?,
        Command::Inspect {
            model,
            r,
            targets,
            batch,
            seq_len,
            dtype,
            checkpointing,
            quantize,
            labelled,
            device,
            prefix,
            json,
        } => {
            let targets =
                (!targets.is_empty()).then_some(graft_peft::TargetModules::Names(targets));
            let shape = graft_trainer::inspect::StepShape {
                batch,
                seq_len,
                dtype: dtype.dtype(),
                checkpointing,
                quantize,
                labelled,
                composed_ops: match device.as_deref() {
                    Some("cpu") => false,
                    Some(_) => true,
                    None => !graft_model::default_device()?.is_cpu(),
                },
                prefix: prefix.unwrap_or(0),
            };
            let path = resolve_model(&model, Files::Config)?;
            let report = graft_trainer::inspect::inspect(&path, targets, r, shape)
                .with_context(|| format!("inspecting {}", model.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                let m = &report.memory;
                println!(
                    "{} model: {} layers, hidden {}, {} heads over {} key/value heads, vocab {}",
                    report.model_type,
                    report.layers,
                    report.hidden_size,
                    report.heads,
                    report.kv_heads,
                    report.vocab_size
                );
                println!(
                    "parameters: {} ({:.2} B)",
                    report.params,
                    report.params as f64 / 1e9
                );
                let share = 100.0 * report.trainable as f64 / report.params as f64;
                match prefix {
                    Some(n) => println!(
                        "key/value prefix of {n}: {} trainable values ({share:.4}% of the model)",
                        report.trainable
                    ),
                    None => println!(
                        "LoRA r={r}: {} trainable values on {} sites ({share:.4}% of the model)",
                        report.lora_trainable, report.lora_sites
                    ),
                }
                println!(
                    "training step, batch {batch} x {seq_len} tokens, {dtype}{}{}: about {:.2} GiB \
                     (weights {:.2}{}, trainable + AdamW {:.3}, activations {:.2}, logits {:.2})",
                    quantize.map_or(String::new(), |q| format!(" on a {q} base")),
                    if checkpointing {
                        " with checkpointing"
                    } else {
                        ""
                    },
                    gib(m.total),
                    gib(m.weights),
                    if quantize.is_some() {
                        format!(", dequantized at a time {:.2}", gib(m.dequantized))
                    } else {
                        String::new()
                    },
                    gib(m.trainable),
                    gib(m.activations),
                    gib(m.logits)
                );
            }
        }
        Command::FetchModel { name } => {
            println!("{}", resolve_model(&name, Files::Model)?.display());
        }
        Command::FetchBlas => {
            let path = graft_model::ops::fetch_blas()?;
            println!("{}", path.display());
            eprintln!("large products run on {}", graft_model::ops::matmul_path());
        }
        Command::Plugins { plugins } => {
            let dirs = search_dirs(&plugins.plugin_dirs);
            let registry = Registry::discover(&dirs);
            println!(
                "searched: {}",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for p in &registry.plugins {
                println!(
                    "{:<16} {:<8} {:<15} {}\n{:<16} abi: {}",
                    p.method.name(),
                    p.method.version(),
                    p.method.peft_type(),
                    p.path.display(),
                    "",
                    p.abi
                );
            }
            for refused in &registry.refused {
                println!("refused: {refused}");
            }
            for shadowed in &registry.shadowed {
                println!("shadowed by an earlier directory: {}", shadowed.display());
            }
            if registry.plugins.is_empty() {
                bail!("no plugins found");
            }
        }
    }
    Ok(())
}

/// Training's first line when the large products will not run on OpenBLAS: why, and how to
/// install it.
fn print_matmul_notice() {
    if let Some(notice) = graft_model::ops::blas_notice() {
        eprintln!("note: {notice}");
    }
}

fn report_outcome(outcome: &train::Outcome) {
    println!(
        "run: {}\nbest validation (step {} of {}): accuracy {:.4}  precision {:.4}  recall {:.4}  F1 {:.4}",
        outcome.run_dir.display(),
        outcome.best_step,
        outcome.steps,
        outcome.best.accuracy,
        outcome.best.precision,
        outcome.best.recall,
        outcome.best.f1
    );
}

fn report_tag_outcome(outcome: &tag_train::TagOutcome) {
    println!(
        "run: {}\nphrases: {}\nbest held-out (step {} of {}): entity precision {:.4}  recall \
         {:.4}  F1 {:.4}  token accuracy {:.4}",
        outcome.run_dir.display(),
        outcome.marking,
        outcome.best_step,
        outcome.steps,
        outcome.best.precision,
        outcome.best.recall,
        outcome.best.f1,
        outcome.best.token_accuracy
    );
}

fn open(adapter: &Path, model: Option<&Path>, registry: &Registry) -> Result<Classifier> {
    let device = graft_model::default_device()?;
    let model = model
        .map(|spec| resolve_model(spec, Files::Model))
        .transpose()?;
    let context = || format!("loading the adapter in {}", adapter.display());
    let spec = TaskSpec::locate(adapter, model.as_deref(), registry).with_context(context)?;
    graft_trainer::config::labels_sequences(spec.pooling).with_context(context)?;
    Classifier::open_with_spec(adapter, spec, registry, &device).with_context(context)
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// The error and its causes joined by ": ", leaving out a cause its wrapper already quotes
/// (graft's errors print their source, e.g. `{path}: {source}`).
fn error_chain(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

fn main() -> ExitCode {
    graft_model::runtime::init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
