//! `cargo xtask gpu-check`: the precision path end to end on an NVIDIA GPU. Builds graft for
//! CUDA (and for the CPU), trains LoRA and P-tuning v2 on SmolLM2 in bf16 on the GPU for a few
//! steps with the decoder recipe, checks that the loss falls and that the trained adapter's
//! next-token logits on the GPU in bf16 are within [`LOGITS_TOLERANCE`] of the CPU's in f32,
//! and tabulates tokens/s and peak GPU memory (nvidia-smi, sampled every 100 ms).
use crate::bench::{decoder_config, default_out, read_json, read_toml, DECODER_CONFIG};
use crate::{build, root, run_graft, Backend};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The largest bf16-against-f32 logit difference accepted, relative to the largest logit:
/// graft's own bf16 check (graft-testkit's BF16_LOGITS_TOLERANCE) allows the same, and measured 0.012-0.038
/// on the CPU.
const LOGITS_TOLERANCE: f64 = 0.06;

const METHODS: [&str; 2] = ["lora", "p-tuning-v2"];

/// The loss must fall to this fraction of the first step's or below, over at least
/// [`MIN_STEPS`] steps of the decoder recipe. Measured with `cargo xtask gpu-check --cpu` (bf16
/// on the CPU, 2026-12-07): LoRA 4.43 -> 0.44 (0.10 of the first), P-tuning v2 10.68 -> 3.88
/// (0.36); with the optimizer's learning rate zeroed the last losses were 1.10 and 1.16 of the
/// first, and no step went below 0.84 of it.
const LOSS_FALLS_TO: f64 = 0.5;
const MIN_STEPS: usize = 10;

const PROMPT: &str = "Aspirin for the primary prevention of cardiovascular events in the \
    elderly. A randomised trial of 19,114 people aged 70 or older.";

/// Peak `memory.used` (MiB) of GPU 0 while it runs, sampled by nvidia-smi.
struct GpuMemory {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<Option<u64>>,
}

impl GpuMemory {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = None;
            while !flag.load(Ordering::Relaxed) {
                let used = std::process::Command::new("nvidia-smi")
                    .args([
                        "--query-gpu=memory.used",
                        "--format=csv,noheader,nounits",
                        "-i",
                        "0",
                    ])
                    .output()
                    .ok()
                    .and_then(|o| String::from_utf8(o.stdout).ok())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if let Some(used) = used {
                    peak = Some(peak.map_or(used, |p: u64| p.max(used)));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            peak
        });
        Self { stop, sampler }
    }

    fn finish(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().ok().flatten()
    }
}

fn logits(path: &Path) -> Result<Vec<f64>> {
    let report = read_json(path)?;
    report["logits"]
        .as_array()
        .with_context(|| format!("{} has no logits", path.display()))?
        .iter()
        .map(|v| v.as_f64().context("a logit is not a number"))
        .collect()
}

/// `max |a - b| / max |b|`.
fn relative_difference(a: &[f64], b: &[f64]) -> Result<f64> {
    if a.len() != b.len() || b.is_empty() {
        bail!("{} logits against {}", a.len(), b.len());
    }
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    Ok(diff / scale.max(1e-12))
}

/// Runs the check with the trained side on `device` (`Backend::Cpu` checks the script itself
/// where there is no GPU).
pub fn gpu_check(steps: usize, out: Option<PathBuf>, device: Backend) -> Result<()> {
    if steps < MIN_STEPS {
        bail!("--steps {steps}: the check judges the loss after at least {MIN_STEPS} steps");
    }
    let out = out.unwrap_or_else(default_out);
    build(Backend::Cpu)?;
    if device == Backend::Cuda {
        build(Backend::Cuda)?;
    }
    let recipe = read_toml(&root().join(DECODER_CONFIG))?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for method in METHODS {
        let run = out.join(method);
        let dir = root().join(&run);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("config.toml");
        std::fs::write(
            &config_path,
            toml::to_string(&decoder_config(&recipe, method, steps)?)?,
        )
        .with_context(|| format!("writing {}", config_path.display()))?;
        eprintln!(
            "gpu-check: {method}, {steps} steps in bf16 on {device:?} -> {}",
            run.display()
        );
        let memory = (device == Backend::Cuda).then(GpuMemory::start);
        let run_arg = run.display().to_string();
        let arg = |s: &str| s.to_string();
        run_graft(
            device,
            &[
                arg("train-lm"),
                arg("--config"),
                config_path.display().to_string(),
                arg("--out"),
                run_arg.clone(),
                arg("--dtype"),
                arg("bf16"),
            ],
        )?;
        let peak_gpu_mib = memory.and_then(GpuMemory::finish);
        let (narrow, wide) = (
            dir.join("logits-bf16.json"),
            dir.join("logits-cpu-f32.json"),
        );
        let logits_of = |backend, dtype: &str, file: &Path| {
            run_graft(
                backend,
                &[
                    arg("logits"),
                    arg("--adapter"),
                    run_arg.clone(),
                    arg("--prompt"),
                    arg(PROMPT),
                    arg("--dtype"),
                    arg(dtype),
                    arg("--out"),
                    file.display().to_string(),
                ],
            )
        };
        logits_of(device, "bf16", &narrow)?;
        logits_of(Backend::Cpu, "f32", &wide)?;
        let difference = relative_difference(&logits(&narrow)?, &logits(&wide)?)?;
        let summary = read_json(&dir.join("train.json"))?;
        let losses: Vec<f64> = summary["losses"]
            .as_array()
            .map(|l| l.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let (first, last) = (losses.first().copied(), losses.last().copied());
        let falls = matches!((first, last), (Some(f), Some(l)) if l <= LOSS_FALLS_TO * f);
        if !falls {
            failures.push(format!(
                "{method}: the loss did not fall to {LOSS_FALLS_TO} of the first step's: {losses:?}"
            ));
        }
        if difference > LOGITS_TOLERANCE {
            failures.push(format!(
                "{method}: bf16 logits on {device:?} differ from the CPU's f32 by {difference:.4} of the largest (over {LOGITS_TOLERANCE})"
            ));
        }
        rows.push(json!({
            "method": method,
            "steps": losses.len(),
            "first_loss": first,
            "last_loss": last,
            "train_tokens_per_s": summary["train_tokens_per_s"],
            "step_seconds_median": summary["step_seconds_median"],
            "peak_gpu_mib": peak_gpu_mib,
            "peak_rss_mb": summary["peak_rss_mb"],
            "logits_relative_difference": difference,
        }));
    }
    let mut table = format!(
        "`cargo xtask gpu-check --steps {steps}{}`: SmolLM2-135M-Instruct, bf16 base, f32 adapters; logits against the CPU in f32 (tolerance {LOGITS_TOLERANCE} of the largest).\n\n\
         | method | steps | loss, first | loss, last | training tokens/s | peak GPU memory (MiB) | peak RSS (MiB) | logits difference |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        if device == Backend::Cpu { " --cpu" } else { "" }
    );
    for r in &rows {
        let number =
            |v: &Value, digits: usize| v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"));
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["method"].as_str().unwrap_or("?"),
            r["steps"],
            number(&r["first_loss"], 3),
            number(&r["last_loss"], 3),
            number(&r["train_tokens_per_s"], 0),
            number(&r["peak_gpu_mib"], 0),
            number(&r["peak_rss_mb"], 0),
            number(&r["logits_relative_difference"], 4),
        ));
    }
    println!("{table}");
    let dir = root().join(&out);
    std::fs::write(dir.join("gpu-check.md"), &table)?;
    std::fs::write(
        dir.join("gpu-check.json"),
        serde_json::to_string_pretty(&json!({ "device": format!("{device:?}"), "rows": rows }))?,
    )?;
    if !failures.is_empty() {
        bail!("gpu-check failed:\n{}", failures.join("\n"));
    }
    Ok(())
}
