//! `graft`: fine-tune transformer models with PEFT methods loaded as plugins.
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use graft_peft::loader::{search_dirs, Registry};
use graft_trainer::data::Dataset;
use graft_trainer::task::Classifier;
use graft_trainer::train::{self, Examples};
use graft_trainer::TrainConfig;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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

#[derive(Args, Clone)]
struct PluginArgs {
    /// Directory to search for method plugins (repeatable; searched before $GRAFT_PLUGIN_PATH
    /// and the binary's own directory).
    #[arg(long = "plugin-dir", global = true)]
    plugin_dirs: Vec<PathBuf>,
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
        /// Model folder (config.json, model.safetensors, tokenizer.json).
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
        #[arg(long)]
        adapter: PathBuf,
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
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Write the challenge's submission columns uuid,Keywords,label (Keywords left empty:
        /// graft does not extract keywords).
        #[arg(long)]
        submission: bool,
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
    /// Put a known model (minilm) in graft's cache and print its folder.
    FetchModel { name: String },
    /// List the method plugins found, with versions, paths and ABI strings.
    Plugins {
        #[command(flatten)]
        plugins: PluginArgs,
    },
}

fn registry(args: &PluginArgs) -> Result<Registry> {
    registry_with(args, &[])
}

/// The plugins of `--plugin-dir`, then of a training config's `[plugins] dirs`, then the
/// environment's and the binary's.
fn registry_with(args: &PluginArgs, config_dirs: &[PathBuf]) -> Result<Registry> {
    let dirs: Vec<PathBuf> = args
        .plugin_dirs
        .iter()
        .chain(config_dirs)
        .cloned()
        .collect();
    Ok(Registry::discover(&search_dirs(&dirs)))
}

/// Default training data: the challenge substitute beside the checkout, else the demo set.
fn default_data() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("../shared/data/abstracts/train.csv"),
        PathBuf::from("data/demo.csv"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!("no --data given and none of {candidates:?} exists (relative to the current directory)")
        })
}

fn model_dir(config: &TrainConfig, flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = flag.or_else(|| config.model.dir.clone()) {
        return Ok(dir);
    }
    let known = graft_model::zoo::find_known(&config.model.name).with_context(|| {
        format!(
            "model.name `{}` is not a model graft can fetch (known: {}); set model.dir or --model",
            config.model.name,
            known_models()
        )
    })?;
    Ok(known.ensure(&mut |m| eprintln!("{m}"))?)
}

fn known_models() -> String {
    graft_model::zoo::KNOWN
        .iter()
        .map(|m| m.alias)
        .collect::<Vec<_>>()
        .join(", ")
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
            if let Some(dir) = resume {
                let saved = TrainConfig::from_file(&dir.join(graft_trainer::run::RunDir::CONFIG))?;
                let registry = registry_with(&plugins, &saved.plugins.dirs)?;
                let outcome = train::resume(&dir, &registry)
                    .with_context(|| format!("resuming the run in {}", dir.display()))?;
                report_outcome(&outcome);
                return Ok(());
            }
            let mut cfg = match &config {
                Some(path) => TrainConfig::from_file(path)?,
                None => TrainConfig::default(),
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
            let data = match data.or_else(|| cfg.data.train.clone()) {
                Some(path) => path,
                None => default_data()?,
            };
            let model = model_dir(&cfg, model)?;
            let out = out.unwrap_or_else(|| graft_trainer::run::default_run_dir(&method_name));
            let outcome = train::train(&cfg, &registry, &model, &data, &out)?;
            report_outcome(&outcome);
        }
        Command::Eval {
            adapter,
            data,
            out,
            plugins,
        } => {
            let registry = registry(&plugins)?;
            let classifier = open(&adapter, &registry)?;
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
            data,
            out,
            submission,
            plugins,
        } => {
            let registry = registry(&plugins)?;
            let classifier = open(&adapter, &registry)?;
            let dataset = Dataset::read(&data, &classifier.template.columns())?;
            let texts = dataset.texts(&classifier.template)?;
            let mut rows = String::from(if submission {
                "uuid,Keywords,label\n"
            } else {
                "uuid,label\n"
            });
            for (records, chunk) in dataset.records.chunks(32).zip(texts.chunks(32)) {
                let logits = classifier.logits(chunk)?;
                for (record, class) in records.iter().zip(graft_model::bert::argmax(&logits)?) {
                    let label = classifier.labels.labels()[class as usize].as_str();
                    let uuid = csv_field(&record.uuid);
                    if submission {
                        rows.push_str(&format!("{uuid},,{}\n", csv_field(label)));
                    } else {
                        rows.push_str(&format!("{uuid},{}\n", csv_field(label)));
                    }
                }
            }
            graft_peft::adapter::write_atomic(&out, rows.as_bytes())
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
            let mut classifier = open(&adapter, &registry)?;
            classifier.set_merged(true)?;
            classifier
                .save_model(&out)
                .with_context(|| format!("writing the merged model to {}", out.display()))?;
            eprintln!("merged model written to {}", out.display());
        }
        Command::FetchModel { name } => {
            let known = graft_model::zoo::find_known(&name)
                .with_context(|| format!("unknown model `{name}` (known: {})", known_models()))?;
            println!("{}", known.ensure(&mut |m| eprintln!("{m}"))?.display());
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

fn open(adapter: &Path, registry: &Registry) -> Result<Classifier> {
    let device = graft_model::default_device()?;
    Classifier::open(adapter, registry, &device)
        .with_context(|| format!("loading the adapter in {}", adapter.display()))
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

fn main() -> ExitCode {
    graft_model::runtime::init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
