//! `cargo xtask`: builds graft and its plugins, then runs them; fetches models.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;
mod scaffold;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build graft and the method's plugin, then `graft train` (config: configs/<method>.toml).
    Train {
        #[arg(long, default_value = "lora")]
        method: String,
        /// Further `graft train` options (--config, --model, --data, --out, --epochs, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Build graft and every plugin, then `graft eval ...`.
    Eval {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Build graft and every plugin, then `graft predict ...`.
    Predict {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Build graft and every plugin, then run any graft subcommand: `cargo xtask graft merge ...`.
    Graft {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Build every workspace crate (plugins and test fixtures too), then run every test.
    Test {
        /// Further `cargo test` arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Put a known model (minilm) in graft's cache.
    FetchModel { name: String },
    /// Create a standalone plugin crate (outside the workspace) that builds against this
    /// checkout's graft-peft: a working bias-tuning method with the test kit's checks.
    NewPlugin {
        /// Method name (lowercase, digits, '-').
        name: String,
        /// Folder to create (default: ./graft-plugin-<name>).
        #[arg(long)]
        path: Option<PathBuf>,
        /// Only rewrite the folder's .cargo/config.toml for the current graft build.
        #[arg(long)]
        refresh: bool,
        /// Use the libraries of the existing build instead of building the workspace first.
        #[arg(long)]
        no_build: bool,
    },
    /// Train each method for a fixed step budget with its config (batch 8 x 128 tokens) and
    /// tabulate trainable parameters, seconds per step, tokens/s, peak RSS and validation F1.
    Bench {
        /// Comma-separated method names, or `all` (every in-tree plugin).
        #[arg(long, default_value = "all")]
        methods: String,
        /// Optimizer steps per method; validation F1 is measured after the last.
        #[arg(long, default_value_t = 100)]
        steps: usize,
        /// Folder for the runs, bench.json and bench.md (default: runs/bench-<unix seconds>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// `minilm` (classification, configs/<method>.toml) or `smollm2` (causal-LM training
        /// of configs/lm/smollm2-lora-abstracts.toml with each method's settings).
        #[arg(long, default_value = "minilm", conflicts_with = "reference")]
        model: String,
        /// Compare graft's LoRA with the PyTorch + Hugging Face PEFT reference
        /// (benches/reference), alternating the two systems round by round.
        #[arg(long)]
        reference: bool,
        /// Rounds of the --reference comparison; each system's median over rounds is reported.
        #[arg(long, default_value_t = 3, requires = "reference")]
        rounds: usize,
    },
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub(crate) fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Package names of the in-tree method plugins (`plugins/*/Cargo.toml`).
pub(crate) fn plugin_packages() -> Result<Vec<String>> {
    let dir = root().join("plugins");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let manifest = entry?.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        if let Some(name) = text.lines().find_map(|l| {
            l.strip_prefix("name = \"")
                .and_then(|n| n.strip_suffix('"'))
        }) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Builds the whole workspace, always: graft-peft is a shared library that the binary and every
/// plugin link, so they must come from one cargo invocation with one feature resolution (a
/// narrower `-p` selection can resolve candle's features differently and rebuild it apart).
pub(crate) fn build() -> Result<()> {
    let status = Command::new(cargo())
        .current_dir(root())
        .args(["build", "--quiet", "--workspace"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    Ok(())
}

pub(crate) fn run_graft(args: &[String]) -> Result<()> {
    let graft = target_dir().join("debug").join("graft");
    let status = Command::new(&graft)
        .current_dir(root())
        .args(args)
        .status()
        .with_context(|| format!("running {}", graft.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Train { method, rest } => {
            let package = format!("graft-plugin-{method}");
            if !plugin_packages()?.contains(&package) {
                bail!(
                    "no in-tree plugin for method `{method}` (have: {})",
                    plugin_packages()?.join(", ")
                );
            }
            build()?;
            let mut args = vec!["train".to_string(), "--method".into(), method.clone()];
            let config = root().join("configs").join(format!("{method}.toml"));
            if !rest.iter().any(|a| a == "--config") && config.is_file() {
                args.extend(["--config".into(), format!("configs/{method}.toml")]);
            }
            args.extend(rest);
            run_graft(&args)
        }
        Task::Eval { rest } => {
            build()?;
            run_graft(&[vec!["eval".to_string()], rest].concat())
        }
        Task::Predict { rest } => {
            build()?;
            run_graft(&[vec!["predict".to_string()], rest].concat())
        }
        Task::Graft { rest } => {
            build()?;
            run_graft(&rest)
        }
        Task::Test { rest } => {
            build()?;
            let status = Command::new(cargo())
                .current_dir(root())
                .args(["test", "--workspace"])
                .args(&rest)
                .status()
                .context("running cargo test")?;
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
            Ok(())
        }
        Task::FetchModel { name } => {
            build()?;
            run_graft(&["fetch-model".to_string(), name])
        }
        Task::NewPlugin {
            name,
            path,
            refresh,
            no_build,
        } => scaffold::new_plugin(&name, path, refresh, !no_build),
        Task::Bench {
            methods,
            steps,
            out,
            model,
            reference: false,
            ..
        } => match model.as_str() {
            "minilm" => bench::methods(&methods, steps, out),
            "smollm2" => bench::decoder_methods(&methods, steps, out),
            other => bail!("--model {other}: the bench knows minilm and smollm2"),
        },
        Task::Bench {
            methods,
            steps,
            out,
            reference: true,
            rounds,
            ..
        } => bench::reference(&methods, steps, rounds, out),
    }
}
