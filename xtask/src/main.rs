//! `cargo xtask`: builds graft and its plugins, then runs them; fetches models.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;
mod cuda;
mod decoder_reference;
mod gpu_check;
mod modules;
mod scaffold;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

/// Which candle backend the workspace is built with.
#[derive(clap::Args)]
struct Features {
    /// `cuda`: build with candle's CUDA backend into target/cuda (the CPU build in target/debug
    /// stays as it is) and run graft from there. Put it before graft's own options.
    #[arg(long, value_parser = ["cuda"])]
    features: Option<String>,
}

impl Features {
    fn backend(&self) -> Backend {
        match self.features {
            Some(_) => Backend::Cuda,
            None => Backend::Cpu,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Backend {
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Task {
    /// Build graft and the method's plugin, then `graft train` (config: the plugin's own,
    /// embedded from configs/<method>.toml).
    Train {
        #[arg(long, default_value = "lora")]
        method: String,
        #[command(flatten)]
        features: Features,
        /// Further `graft train` options (--config, --model, --data, --out, --epochs, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Build graft and every plugin, then `graft train-lm ...` (causal-LM fine-tuning of a
    /// decoder: --config configs/lm/..., --out, --dtype, --checkpointing, --max-steps).
    TrainLm {
        #[command(flatten)]
        features: Features,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// On a machine with an NVIDIA GPU: build for CUDA, train LoRA and P-tuning v2 on
    /// SmolLM2 in bf16 on the GPU for a few steps, check that the loss falls and that the
    /// logits match the CPU's f32 ones, and tabulate tokens/s and peak GPU memory.
    GpuCheck {
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Folder for the runs, gpu-check.json and gpu-check.md (default: runs/bench-<unix seconds>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Train on the CPU instead (checks the script where there is no GPU).
        #[arg(long)]
        cpu: bool,
    },
    /// Build graft and every plugin, then `graft eval ...`.
    Eval {
        #[command(flatten)]
        features: Features,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Build graft and every plugin, then `graft predict ...`.
    Predict {
        #[command(flatten)]
        features: Features,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Build graft and every plugin, then run any graft subcommand: `cargo xtask graft merge ...`.
    Graft {
        #[command(flatten)]
        features: Features,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Only build graft and every plugin, and print the folder they are in.
    Build {
        #[command(flatten)]
        features: Features,
    },
    /// List the module cycles of every crate in crates/ (files that name each other's
    /// items); fails if there is one. `cargo xtask test` runs the same check.
    Modules,
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
        /// of configs/lm/smollm2-lora-abstracts.toml with each method's settings; with
        /// --reference, LoRA training, verbalizer scoring and generation beside the reference).
        #[arg(long, default_value = "minilm")]
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

/// Python's `sentencepiece`, the reference graft-tokenizer's `tests/sentencepiece.rs` checks
/// graft's reader against, installed by pip into target/spm-site (which the test puts on
/// `PYTHONPATH`) unless it is there: like the models and OpenBLAS, fetched by the test command
/// itself, so that it passes on a fresh machine with nothing else run. pip's `--target` needs
/// no virtual environment (no python3-venv package).
fn spm_reference() -> Result<()> {
    const PACKAGE: &str = "sentencepiece==0.2.2";
    let site = root().join("target/spm-site");
    if site.join("sentencepiece").is_dir() {
        return Ok(());
    }
    eprintln!(
        "installing {PACKAGE} into {} (the SentencePiece tests' reference)",
        site.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--root-user-action=ignore",
            "--no-deps",
            "--upgrade",
            "--target",
        ])
        .arg(&site)
        .arg(PACKAGE)
        .status()
        .context("running `python3 -m pip` (the SentencePiece tests need Python 3 with pip)")?;
    if !status.success() {
        bail!(
            "`python3 -m pip install --target {} {PACKAGE}` failed ({status})",
            site.display()
        );
    }
    Ok(())
}

/// llama.cpp, which graft-cli's `tests/gguf_export.rs` runs graft's GGUF exports in: npm's
/// `node-llama-cpp` with its prebuilt CPU build for Linux x86-64 (pinned; the GPU builds, which
/// are optional packages, left out; no install script: the prebuilt library is used as it is),
/// installed into target/llama-cpp-node unless it is there. PyPI's llama.cpp wheels need a newer
/// glibc or libstdc++ than Debian 12's, and building one from source takes far longer.
fn llama_cpp_reference() -> Result<()> {
    const PACKAGES: [&str; 2] = ["node-llama-cpp@3.21.1", "@node-llama-cpp/linux-x64@3.21.1"];
    let prefix = root().join("target/llama-cpp-node");
    if prefix
        .join("node_modules/@node-llama-cpp/linux-x64")
        .is_dir()
    {
        return Ok(());
    }
    eprintln!(
        "installing {} into {} (llama.cpp, for the GGUF export test)",
        PACKAGES.join(" "),
        prefix.display()
    );
    std::fs::create_dir_all(&prefix)?;
    let status = Command::new("npm")
        .args([
            "install",
            "--save-exact",
            "--omit=optional",
            "--ignore-scripts",
        ])
        .args(["--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
        .arg(&prefix)
        .args(PACKAGES)
        .status()
        .context("running `npm` (the GGUF export test needs Node.js 20 or newer with npm)")?;
    if !status.success() {
        bail!(
            "`npm install --prefix {} {}` failed ({status})",
            prefix.display(),
            PACKAGES.join(" ")
        );
    }
    Ok(())
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

/// The folder of graft, graft-peft and the plugins. The CUDA build has a target dir of its own:
/// graft-peft is loaded from the binary's folder, so one build must never overwrite the other's.
pub(crate) fn bin_dir(backend: Backend) -> PathBuf {
    match backend {
        Backend::Cpu => target_dir().join("debug"),
        Backend::Cuda => target_dir().join("cuda").join("debug"),
    }
}

/// Builds the whole workspace, always: graft-peft is a shared library that the binary and every
/// plugin link, so they must come from one cargo invocation with one feature resolution (a
/// narrower `-p` selection can resolve candle's features differently and rebuild it apart).
/// The CUDA build turns on graft-cli's `cuda`, which reaches graft-peft and every plugin through
/// feature unification. A CPU build then makes sure graft's copy of OpenBLAS is in its cache.
pub(crate) fn build(backend: Backend) -> Result<()> {
    let mut command = build_command(backend);
    if backend == Backend::Cuda {
        cuda::build_env(&mut command, &cuda::toolkit()?);
    }
    let status = command.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    if backend == Backend::Cpu {
        fetch_blas();
    }
    Ok(())
}

/// `graft fetch-blas`: without OpenBLAS the large CPU products run on the gemm crate at about
/// half the speed, and graft's own copy needs no system package. A failed fetch (no registry)
/// is only a warning: graft runs without it, and its first line says so.
fn fetch_blas() {
    let graft = bin_dir(Backend::Cpu).join("graft");
    let status = Command::new(&graft)
        .current_dir(root())
        .arg("fetch-blas")
        .stdout(std::process::Stdio::null())
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!(
            "warning: `{} fetch-blas` failed; graft runs without its OpenBLAS copy",
            graft.display()
        );
    }
}

/// The `cargo build` of [`build`], without the CUDA toolkit's environment. Never `--quiet`: a
/// first build takes minutes (the CUDA one many more), and cargo's progress is what shows it.
fn build_command(backend: Backend) -> Command {
    let mut command = Command::new(cargo());
    command.current_dir(root()).args(["build", "--workspace"]);
    if backend == Backend::Cuda {
        command
            .args(["--features", "graft-cli/cuda"])
            .env("CARGO_TARGET_DIR", target_dir().join("cuda"));
    }
    command
}

pub(crate) fn run_graft(backend: Backend, args: &[String]) -> Result<()> {
    let graft = bin_dir(backend).join("graft");
    let mut command = Command::new(&graft);
    command.current_dir(root()).args(args);
    if backend == Backend::Cuda {
        cuda::run_env(&mut command, &cuda::toolkit()?, &bin_dir(Backend::Cpu));
    }
    let status = command
        .status()
        .with_context(|| format!("running {}", graft.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Train {
            method,
            features,
            rest,
        } => {
            let package = format!("graft-plugin-{method}");
            if !plugin_packages()?.contains(&package) {
                bail!(
                    "no in-tree plugin for method `{method}` (have: {})",
                    plugin_packages()?.join(", ")
                );
            }
            let backend = features.backend();
            build(backend)?;
            // Without --config graft starts from the plugin's recommended config, which every
            // in-tree plugin embeds from configs/<method>.toml.
            let mut args = vec!["train".to_string(), "--method".into(), method.clone()];
            args.extend(rest);
            run_graft(backend, &args)
        }
        Task::TrainLm { features, rest } => {
            let backend = features.backend();
            build(backend)?;
            let mut args = vec!["train-lm".to_string()];
            // A run folder by default, as `train` writes one.
            if !rest.iter().any(|a| a == "--out") {
                let seconds = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                args.extend(["--out".into(), format!("runs/lm-{seconds}")]);
            }
            args.extend(rest);
            run_graft(backend, &args)
        }
        Task::GpuCheck { steps, out, cpu } => {
            let device = if cpu { Backend::Cpu } else { Backend::Cuda };
            gpu_check::gpu_check(steps, out, device)
        }
        Task::Eval { features, rest } => {
            build(features.backend())?;
            run_graft(
                features.backend(),
                &[vec!["eval".to_string()], rest].concat(),
            )
        }
        Task::Predict { features, rest } => {
            build(features.backend())?;
            run_graft(
                features.backend(),
                &[vec!["predict".to_string()], rest].concat(),
            )
        }
        Task::Graft { features, rest } => {
            build(features.backend())?;
            run_graft(features.backend(), &rest)
        }
        Task::Build { features } => {
            build(features.backend())?;
            println!("{}", bin_dir(features.backend()).display());
            Ok(())
        }
        Task::Modules => modules::check(&root()),
        Task::Test { rest } => {
            build(Backend::Cpu)?;
            spm_reference()?;
            llama_cpp_reference()?;
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
            build(Backend::Cpu)?;
            run_graft(Backend::Cpu, &["fetch-model".to_string(), name])
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
            model,
            reference: true,
            rounds,
        } => match model.as_str() {
            "minilm" => bench::reference(&methods, steps, rounds, out),
            "smollm2" if methods == "all" || methods == "lora" => {
                decoder_reference::decoder_reference(steps, rounds, out)
            }
            "smollm2" => {
                bail!("--reference compares LoRA only; drop --methods or pass --methods lora")
            }
            other => bail!("--model {other}: the bench knows minilm and smollm2"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh machine's first `cargo xtask train` compiles for minutes: cargo's progress must
    /// show, both for xtask itself (the alias) and for the workspace build it runs.
    #[test]
    fn builds_show_cargo_progress() {
        for backend in [Backend::Cpu, Backend::Cuda] {
            let command = build_command(backend);
            let args: Vec<_> = command.get_args().collect();
            assert!(args.starts_with(&["build".as_ref(), "--workspace".as_ref()]));
            assert!(
                !args.iter().any(|a| *a == "--quiet" || *a == "-q"),
                "{args:?}"
            );
        }
        let config = std::fs::read_to_string(root().join(".cargo/config.toml")).unwrap();
        let config: toml::Table = config.parse().unwrap();
        let alias = config["alias"]["xtask"].as_str().unwrap();
        assert!(alias.starts_with("run "), "{alias}");
        assert!(
            !alias
                .split_whitespace()
                .any(|a| a == "--quiet" || a == "-q"),
            "{alias}"
        );
    }
}
