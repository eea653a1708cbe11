//! `cargo xtask`: builds graft and its plugins, then runs them; fetches models.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;
mod cuda;
mod decoder_reference;
mod gpu_kit;
mod modules;
mod ptx;
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

/// Cargo's profile: `Dev` for everything run from the checkout, `Release` for the GPU kit.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Profile {
    Dev,
    Release,
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
    /// Pack the GPU kit: one folder (at most 60 MiB) whose `run.sh OUT_DIR` checks graft on a
    /// GPU machine without Rust, nvcc or network (correctness against the CPU, ChatGLM2-6B's
    /// shape at scale, Llama shapes beside PyTorch + PEFT) and writes report.json and
    /// report.md. Builds the release CUDA build and checks its PTX first (`check-ptx`).
    GpuKit {
        /// The kit's folder (default: target/gpu-kit, or target/gpu-kit-dry-run).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Pack the CPU debug build with tiny shapes instead, and run its run.sh here with no
        /// cargo, rustc or nvcc on PATH (into the kit's folder name + `.out`).
        #[arg(long)]
        dry_run: bool,
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
        /// The release profile (what `gpu-kit` packs) instead of the dev one.
        #[arg(long)]
        release: bool,
    },
    /// Check a CUDA build for the oldest driver it needs: every embedded PTX module's ISA
    /// version at most CUDA 13.0's (driver 580), and only CUDA 13's libraries linked.
    CheckPtx {
        /// The folder of graft and its libraries (default: the release CUDA build's).
        #[arg(long)]
        dir: Option<PathBuf>,
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

/// A Python package a test checks graft against, installed by pip into `target/<site>` (which
/// the test puts on `PYTHONPATH`) unless `target/<site>/<module>` is there: like the models and
/// OpenBLAS, fetched by the test command itself, so that the tests pass on a fresh machine with
/// nothing else run. pip's `--target` needs no virtual environment (no python3-venv package).
struct PythonReference {
    /// pip's requirement, pinned.
    package: &'static str,
    site: &'static str,
    module: &'static str,
    /// Whether pip installs its dependencies too.
    with_deps: bool,
    /// What the tests use it for.
    role: &'static str,
}

/// `sentencepiece`, the reference graft-tokenizer's `tests/sentencepiece.rs` checks graft's
/// reader against; `tensorboard`, whose own reader graft-cli's `tests/tensorboard.rs` reads
/// graft's event files with.
const PYTHON_REFERENCES: [PythonReference; 2] = [
    PythonReference {
        package: "sentencepiece==0.2.2",
        site: "spm-site",
        module: "sentencepiece",
        with_deps: false,
        role: "the SentencePiece tests' reference",
    },
    PythonReference {
        package: "tensorboard==2.21.0",
        site: "tb-site",
        module: "tensorboard",
        with_deps: true,
        role: "the TensorBoard test's event reader",
    },
];

fn install_python_reference(reference: &PythonReference) -> Result<()> {
    let package = reference.package;
    let site = root().join("target").join(reference.site);
    if site.join(reference.module).is_dir() {
        return Ok(());
    }
    eprintln!(
        "installing {package} into {} ({})",
        site.display(),
        reference.role
    );
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(["--root-user-action=ignore", "--upgrade", "--target"])
    .arg(&site)
    .arg(package);
    if !reference.with_deps {
        pip.arg("--no-deps");
    }
    let status = pip.status().with_context(|| {
        format!(
            "running `python3 -m pip` ({} needs Python 3 with pip)",
            reference.role
        )
    })?;
    if !status.success() {
        bail!(
            "`python3 -m pip install --target {} {package}` failed ({status})",
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
    profile_dir(backend, Profile::Dev)
}

pub(crate) fn profile_dir(backend: Backend, profile: Profile) -> PathBuf {
    let target = match backend {
        Backend::Cpu => target_dir(),
        Backend::Cuda => target_dir().join("cuda"),
    };
    target.join(match profile {
        Profile::Dev => "debug",
        Profile::Release => "release",
    })
}

/// Builds the whole workspace, always: graft-peft is a shared library that the binary and every
/// plugin link, so they must come from one cargo invocation with one feature resolution (a
/// narrower `-p` selection can resolve candle's features differently and rebuild it apart).
/// The CUDA build turns on graft-cli's `cuda`, which reaches graft-peft and every plugin through
/// feature unification. A CPU build then makes sure graft's copy of OpenBLAS is in its cache.
pub(crate) fn build(backend: Backend) -> Result<()> {
    build_profile(backend, Profile::Dev)
}

pub(crate) fn build_profile(backend: Backend, profile: Profile) -> Result<()> {
    let mut command = build_command(backend, profile);
    if backend == Backend::Cuda {
        cuda::build_env(&mut command, &cuda::toolkit()?);
    }
    let status = command.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    if backend == Backend::Cpu && profile == Profile::Dev {
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
fn build_command(backend: Backend, profile: Profile) -> Command {
    let mut command = Command::new(cargo());
    command.current_dir(root()).args(["build", "--workspace"]);
    if profile == Profile::Release {
        command.arg("--release");
    }
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
        Task::GpuKit { out, dry_run } => gpu_kit::gpu_kit(out, dry_run),
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
        Task::Build { features, release } => {
            let profile = if release {
                Profile::Release
            } else {
                Profile::Dev
            };
            build_profile(features.backend(), profile)?;
            println!("{}", profile_dir(features.backend(), profile).display());
            Ok(())
        }
        Task::CheckPtx { dir } => {
            let dir = dir.unwrap_or_else(|| profile_dir(Backend::Cuda, Profile::Release));
            for line in ptx::check(&dir)? {
                println!("{line}");
            }
            Ok(())
        }
        Task::Modules => modules::check(&root()),
        Task::Test { rest } => {
            build(Backend::Cpu)?;
            for reference in &PYTHON_REFERENCES {
                install_python_reference(reference)?;
            }
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
            let command = build_command(backend, Profile::Dev);
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
