//! `cargo xtask bench`: every method trained for the same step budget, one process each, with
//! speed, memory and quality read back from the runs' eval.json. With `--reference`: graft's
//! LoRA against the PyTorch + Hugging Face PEFT script in benches/reference.
use crate::{build, plugin_packages, root, run_graft, Backend};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// In-tree method names (`graft-plugin-<name>`).
fn all_methods() -> Result<Vec<String>> {
    Ok(plugin_packages()?
        .iter()
        .filter_map(|p| p.strip_prefix("graft-plugin-").map(str::to_string))
        .collect())
}

pub(crate) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {cpu}")
}

pub(crate) fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The methods `selection` names (comma-separated, or `all`), each checked to be in-tree.
fn select_methods(selection: &str) -> Result<Vec<String>> {
    let known = all_methods()?;
    let methods: Vec<String> = if selection == "all" {
        known.clone()
    } else {
        selection.split(',').map(|m| m.trim().to_string()).collect()
    };
    for m in &methods {
        if !known.contains(m) {
            bail!(
                "no in-tree plugin for method `{m}` (have: {})",
                known.join(", ")
            );
        }
    }
    Ok(methods)
}

pub fn methods(selection: &str, steps: usize, out: Option<PathBuf>) -> Result<()> {
    let methods = select_methods(selection)?;
    let out = out.unwrap_or_else(default_out);
    build(Backend::Cpu)?;
    let mut rows = Vec::new();
    for method in &methods {
        let run = out.join(method);
        eprintln!("bench: {method}, {steps} steps -> {}", run.display());
        let eval = bench_run(method, steps, &run, &[])?;
        rows.push(json!({
            "method": method,
            "trainable_params": eval["trainable_params"],
            "total_params": eval["total_params"],
            "step_seconds_median": eval["step_seconds_median"],
            "train_tokens_per_s": eval["train_tokens_per_s"],
            "peak_rss_mb": eval["peak_rss_mb"],
            "eval_tokens_per_s": eval["eval_tokens_per_s"],
            "matmul": eval["matmul"],
            "f1": eval["f1"],
            "accuracy": eval["accuracy"],
        }));
    }
    let command = format!("cargo xtask bench --methods {selection} --steps {steps}");
    let report = report(command, steps, rows);
    write_report(&out, &report, &markdown(&report))
}

/// The causal-LM recipe every method trains in the decoder bench.
pub(crate) const DECODER_CONFIG: &str = "configs/lm/smollm2-lora-abstracts.toml";

/// Every method trained for `steps` steps on SmolLM2-135M-Instruct: the recipe of
/// [`DECODER_CONFIG`] (batch 4, prompts up to 600 characters) with the method's settings from
/// its configs/<method>.toml, less its target modules (written for BERT: PEFT's defaults for
/// Llama apply). Speed, memory and losses come from each run's train.json.
pub fn decoder_methods(selection: &str, steps: usize, out: Option<PathBuf>) -> Result<()> {
    let methods = select_methods(selection)?;
    let out = out.unwrap_or_else(default_out);
    build(Backend::Cpu)?;
    let recipe: toml::Table = read_toml(&root().join(DECODER_CONFIG))?;
    let mut rows = Vec::new();
    for method in &methods {
        let run = out.join(method);
        eprintln!(
            "bench: {method} on smollm2, {steps} steps -> {}",
            run.display()
        );
        let config = decoder_config(&recipe, method, steps)?;
        let dir = root().join(&run);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, toml::to_string(&config)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        run_graft(
            Backend::Cpu,
            &[
                "train-lm".into(),
                "--config".into(),
                config_path.display().to_string(),
                "--out".into(),
                run.display().to_string(),
            ],
        )?;
        let summary = read_json(&dir.join("train.json"))?;
        let losses = summary["losses"].as_array().cloned().unwrap_or_default();
        rows.push(json!({
            "method": method,
            "trainable_params": summary["trainable_params"],
            "step_seconds_median": summary["step_seconds_median"],
            "train_tokens_per_s": summary["train_tokens_per_s"],
            "peak_rss_mb": summary["peak_rss_mb"],
            "first_loss": losses.first(),
            "last_loss": losses.last(),
            "matmul": summary["matmul"],
        }));
    }
    let command =
        format!("cargo xtask bench --model smollm2 --methods {selection} --steps {steps}");
    let report = report(command, steps, rows);
    write_report(&out, &report, &decoder_markdown(&report))
}

pub(crate) fn read_toml(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.parse()
        .with_context(|| format!("parsing {}", path.display()))
}

/// The decoder recipe with `method`'s [method] settings and learning rate, `steps` steps and
/// no held-out split (so no verbalizer evaluation). AdaLoRA's schedule is scaled to the short run (its budget needs
/// tinit + tfinal below the step count).
pub(crate) fn decoder_config(
    recipe: &toml::Table,
    method: &str,
    steps: usize,
) -> Result<toml::Table> {
    let own = read_toml(&root().join("configs").join(format!("{method}.toml")))?;
    let mut settings = own
        .get("method")
        .and_then(toml::Value::as_table)
        .cloned()
        .with_context(|| format!("configs/{method}.toml has no [method]"))?;
    settings.remove("target_modules");
    settings.remove("feedforward_modules");
    if method == "adalora" {
        let quarter = (steps / 4).max(1) as i64;
        settings.insert("tinit".into(), quarter.into());
        settings.insert("tfinal".into(), quarter.into());
        settings.insert("deltaT".into(), 1.into());
    }
    let mut config = recipe.clone();
    config.insert("method".into(), settings.into());
    // No held-out split, so no verbalizer evaluation after training.
    if let Some(data) = config.get_mut("data").and_then(toml::Value::as_table_mut) {
        data.insert("val_fraction".into(), 0.0.into());
    }
    let train = config
        .get_mut("train")
        .and_then(toml::Value::as_table_mut)
        .with_context(|| format!("{DECODER_CONFIG} has no [train]"))?;
    train.insert("max_steps".into(), (steps as i64).into());
    if let Some(lr) = own.get("train").and_then(|t| t.get("lr")) {
        train.insert("lr".into(), lr.clone());
    }
    Ok(config)
}

fn decoder_markdown(report: &Value) -> String {
    let what = format!(
        "SmolLM2-135M-Instruct, batch 4 of prompts up to 600 characters, {} steps",
        report["steps"]
    );
    let header = [
        "method",
        "trainable params",
        "s/step (median)",
        "training tokens/s",
        "peak RSS (MiB)",
        "loss, first step",
        "loss, last step",
    ];
    rows_table(report, &what, &header, |row, f| {
        vec![
            row["method"].as_str().unwrap_or_default().to_string(),
            row["trainable_params"].to_string(),
            format!("{:.2}", f("step_seconds_median")),
            format!("{:.0}", f("train_tokens_per_s")),
            format!("{:.0}", f("peak_rss_mb")),
            format!("{:.3}", f("first_loss")),
            format!("{:.3}", f("last_loss")),
        ]
    })
}

/// `runs/bench-<unix seconds>`, relative to the repository root (where graft runs).
pub(crate) fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("bench-{secs}"))
}

/// Prints the table and writes bench.json and bench.md into `out`.
pub(crate) fn write_report(out: &Path, report: &Value, table: &str) -> Result<()> {
    println!("{table}");
    let dir = root().join(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = dir.join("bench.md");
    std::fs::write(&md_path, table).with_context(|| format!("writing {}", md_path.display()))?;
    eprintln!("written: {}/bench.json, bench.md", out.display());
    Ok(())
}

/// One timed training run of `method` with its config, no periodic evaluation: its eval.json.
fn bench_run(method: &str, steps: usize, run: &Path, extra: &[String]) -> Result<Value> {
    let mut args: Vec<String> = vec![
        "train".into(),
        "--method".into(),
        method.into(),
        "--config".into(),
        format!("configs/{method}.toml"),
        "--max-steps".into(),
        steps.to_string(),
        "--eval-every".into(),
        "0".into(),
        "--out".into(),
        run.display().to_string(),
    ];
    args.extend_from_slice(extra);
    run_graft(Backend::Cpu, &args)?;
    read_json(&root().join(run).join("eval.json"))
}

fn markdown(report: &Value) -> String {
    let what = format!(
        "validation F1 after {} steps of 8 x 128 tokens",
        report["steps"]
    );
    let header = [
        "method",
        "trainable params",
        "fraction",
        "s/step (median)",
        "training tokens/s",
        "inference tokens/s",
        "peak RSS (MiB)",
        "validation F1",
    ];
    rows_table(report, &what, &header, |row, f| {
        vec![
            row["method"].as_str().unwrap_or_default().to_string(),
            row["trainable_params"].to_string(),
            format!("{:.4}%", 100.0 * f("trainable_params") / f("total_params")),
            format!("{:.2}", f("step_seconds_median")),
            format!("{:.0}", f("train_tokens_per_s")),
            format!("{:.0}", f("eval_tokens_per_s")),
            format!("{:.0}", f("peak_rss_mb")),
            format!("{:.4}", f("f1")),
        ]
    })
}

/// A markdown table of `report`'s rows, captioned with its command, machine and date, then
/// `what`; `cells(row, number)` gives a row's cells, `number(key)` reading a field as f64.
fn rows_table(
    report: &Value,
    what: &str,
    header: &[&str],
    cells: impl Fn(&Value, &dyn Fn(&str) -> f64) -> Vec<String>,
) -> String {
    let mut table = format!(
        "`{}` on {} ({}); {what}.\n\n| {} |\n| --- |{}\n",
        report["command"].as_str().unwrap_or_default(),
        report["machine"].as_str().unwrap_or_default(),
        report["date"].as_str().unwrap_or_default(),
        header.join(" | "),
        " ---: |".repeat(header.len().saturating_sub(1)),
    );
    for row in report["rows"].as_array().into_iter().flatten() {
        let number = |key: &str| row[key].as_f64().unwrap_or(f64::NAN);
        table.push_str(&format!("| {} |\n", cells(row, &number).join(" | ")));
    }
    table
}

/// The report a methods bench writes: its rows, with the command, machine and date.
fn report(command: String, steps: usize, rows: Vec<Value>) -> Value {
    json!({
        "command": command,
        "machine": machine(),
        "date": today(),
        "steps": steps,
        "rows": rows,
    })
}

/// The model folder both systems load, as graft resolves it: `graft fetch-model` prints the
/// folder it settled on (its cache, or a Hugging Face cache hit), fetching it first if needed.
/// Where graft's cache holds the known model `name` (`graft fetch-model`, fetching it first).
pub(crate) fn fetched_model(name: &str) -> Result<PathBuf> {
    let graft = crate::target_dir().join("debug").join("graft");
    let output = Command::new(&graft)
        .current_dir(root())
        .args(["fetch-model", name])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} fetch-model {name}", graft.display()))?;
    if !output.status.success() {
        bail!("graft fetch-model {name} failed");
    }
    let printed = String::from_utf8_lossy(&output.stdout);
    let path = printed
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .with_context(|| format!("graft fetch-model {name} printed no path"))?;
    Ok(PathBuf::from(path))
}

/// The data graft trains on by default (relative to the repository root), passed to both.
pub(crate) fn bench_data() -> Result<PathBuf> {
    let candidates = ["../shared/data/abstracts/train.csv", "data/demo.csv"];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| root().join(p).is_file())
        .with_context(|| {
            format!(
                "none of {} exists under {}",
                candidates.join(", "),
                root().display()
            )
        })
}

const VENV_HINT: &str = "python3 -m venv target/reference-venv && \
     target/reference-venv/bin/pip install -r benches/reference/requirements.txt";

/// `$GRAFT_REFERENCE_PYTHON`, else the repository's `target/reference-venv`; checked by
/// importing the reference's packages so that a broken setup fails before graft's long run.
pub(crate) fn reference_python(modules: &[&str]) -> Result<PathBuf> {
    let python = match std::env::var_os("GRAFT_REFERENCE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let venv = root()
                .join("target")
                .join("reference-venv")
                .join("bin")
                .join("python");
            if !venv.is_file() {
                bail!(
                    "no Python for the reference: {} is missing and GRAFT_REFERENCE_PYTHON is \
                     unset; create it from the repository root with:\n  {VENV_HINT}",
                    venv.display()
                );
            }
            venv
        }
    };
    let mut needed = vec!["torch", "transformers", "peft", "safetensors"];
    needed.extend_from_slice(modules);
    let status = Command::new(&python)
        .current_dir(root())
        .args(["-c", &format!("import {}", needed.join(", "))])
        .status()
        .with_context(|| format!("running {}", python.display()))?;
    if !status.success() {
        bail!(
            "{} cannot import {}; install them with:\n  {VENV_HINT}\n(or point \
             GRAFT_REFERENCE_PYTHON at an interpreter that has them)",
            python.display(),
            needed.join(", ")
        );
    }
    Ok(python)
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Median of the values present; None when no round reported the key.
pub(crate) fn median(values: &[Option<f64>]) -> Option<f64> {
    let mut present: Vec<f64> = values.iter().flatten().copied().collect();
    present.sort_by(f64::total_cmp);
    let n = present.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(present[n / 2]),
        _ => Some((present[n / 2 - 1] + present[n / 2]) / 2.0),
    }
}

pub(crate) fn ratio(graft: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (graft, reference) {
        (Some(g), Some(r)) if r > 0.0 => Some(g / r),
        _ => None,
    }
}

/// graft's LoRA and the PyTorch + PEFT reference, alternated for `rounds` rounds so that machine
/// noise falls on both: graft train (with its final evaluation), reference train, reference
/// inference. graft trains and evaluates in one process; the reference uses one per mode.
pub fn reference(selection: &str, steps: usize, rounds: usize, out: Option<PathBuf>) -> Result<()> {
    if selection != "all" && selection != "lora" {
        bail!("--reference compares LoRA only (the reference has no other method); drop --methods or pass --methods lora");
    }
    if rounds == 0 || steps == 0 {
        bail!("--rounds and --steps must be positive");
    }
    let out = out.unwrap_or_else(default_out);
    let python = reference_python(&[])?;
    build(Backend::Cpu)?;
    let model = fetched_model("minilm")?;
    let data = bench_data()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out_dir = root().join(&out);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut per_round = Vec::new();
    for round in 1..=rounds {
        let run = out.join(format!("lora-round-{round}"));
        eprintln!(
            "bench --reference: round {round}/{rounds}, graft LoRA, {steps} steps -> {}",
            run.display()
        );
        let graft = bench_run(
            "lora",
            steps,
            &run,
            &[
                "--model".into(),
                model.display().to_string(),
                "--data".into(),
                data.display().to_string(),
            ],
        )?;

        let mut reference = serde_json::Map::new();
        for mode in ["train", "infer"] {
            let file = out_dir.join(format!("reference-round-{round}-{mode}.json"));
            eprintln!(
                "bench --reference: round {round}/{rounds}, PyTorch + PEFT {mode} -> {}",
                file.display()
            );
            let status = Command::new(&python)
                .current_dir(root())
                .arg("benches/reference/peft_reference.py")
                .args(["--mode", mode, "--steps", &steps.to_string()])
                .args(["--threads", &threads.to_string()])
                .arg("--model")
                .arg(&model)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&file)
                .status()
                .with_context(|| {
                    format!(
                        "running {} benches/reference/peft_reference.py",
                        python.display()
                    )
                })?;
            if !status.success() {
                bail!("the reference's {mode} run failed (round {round})");
            }
            reference.insert(mode.to_string(), read_json(&file)?);
        }
        per_round.push(json!({
            "round": round,
            "graft": {
                "step_seconds_median": graft["step_seconds_median"],
                "train_tokens_per_s": graft["train_tokens_per_s"],
                "eval_batch_seconds_median": graft["eval_batch_seconds_median"],
                "eval_tokens_per_s": graft["eval_tokens_per_s"],
                "peak_rss_mb": graft["peak_rss_mb"],
                "f1": graft["f1"],
                "matmul": graft["matmul"],
            },
            "reference": {
                "step_seconds_median": reference["train"]["step_seconds_median"],
                "train_tokens_per_s": reference["train"]["train_tokens_per_s"],
                "train_tokens_per_s_total_time": reference["train"]["train_tokens_per_s_total_time"],
                "train_nonpad_tokens_per_s": reference["train"]["train_nonpad_tokens_per_s"],
                "infer_batch_seconds_median": reference["infer"]["infer_batch_seconds_median"],
                "infer_tokens_per_s": reference["infer"]["infer_tokens_per_s"],
                "train_peak_rss_mb": reference["train"]["peak_rss_mb"],
                "infer_peak_rss_mb": reference["infer"]["peak_rss_mb"],
                "threads": reference["train"]["threads"],
                "versions": reference["train"]["versions"],
            },
        }));
    }

    let over_rounds = |system: &str, key: &str| -> Option<f64> {
        let values: Vec<Option<f64>> = per_round.iter().map(|r| r[system][key].as_f64()).collect();
        median(&values)
    };
    let graft_rss = over_rounds("graft", "peak_rss_mb");
    // graft trains and evaluates in one process; the reference's nearest equal is the larger of
    // its two processes' peaks.
    let reference_rss = match (
        over_rounds("reference", "train_peak_rss_mb"),
        over_rounds("reference", "infer_peak_rss_mb"),
    ) {
        (Some(t), Some(i)) => Some(t.max(i)),
        (t, i) => t.or(i),
    };
    // Seconds per step or batch get decimals; tokens/s and MiB do not.
    let metric = |name: &str, graft: Option<f64>, reference: Option<f64>| {
        let digits = if name.contains(" s/") { 3 } else { 0 };
        json!({ "metric": name, "digits": digits, "graft": graft, "reference": reference, "ratio": ratio(graft, reference) })
    };
    let rows = vec![
        metric(
            "train tokens/s",
            over_rounds("graft", "train_tokens_per_s"),
            over_rounds("reference", "train_tokens_per_s"),
        ),
        metric(
            "train s/step (median)",
            over_rounds("graft", "step_seconds_median"),
            over_rounds("reference", "step_seconds_median"),
        ),
        metric(
            "inference tokens/s",
            over_rounds("graft", "eval_tokens_per_s"),
            over_rounds("reference", "infer_tokens_per_s"),
        ),
        metric(
            "inference s/batch (median)",
            over_rounds("graft", "eval_batch_seconds_median"),
            over_rounds("reference", "infer_batch_seconds_median"),
        ),
        metric("peak RSS (MiB)", graft_rss, reference_rss),
    ];
    // Which matrix path graft ran, and the GRAFT_BLAS that chose it, so that a table says
    // whether it was the default path.
    let mut matmul: Vec<&str> = per_round
        .iter()
        .filter_map(|r| r["graft"]["matmul"].as_str())
        .collect();
    matmul.dedup();
    let blas_env =
        std::env::var("GRAFT_BLAS").map_or(String::new(), |v| format!("GRAFT_BLAS={v} "));
    let report = json!({
        "command": format!("{blas_env}cargo xtask bench --reference --steps {steps} --rounds {rounds}"),
        "graft_matmul": matmul.join(", then "),
        "machine": machine(),
        "date": today(),
        "steps": steps,
        "rounds": rounds,
        "threads": threads,
        "data": data.display().to_string(),
        "reference_versions": per_round[0]["reference"]["versions"],
        "reference_peak_rss_mb": {
            "train": over_rounds("reference", "train_peak_rss_mb"),
            "infer": over_rounds("reference", "infer_peak_rss_mb"),
        },
        "rows": rows,
        "per_round": per_round,
    });
    write_report(&out, &report, &reference_markdown(&report))
}

/// A number for a table with `digits` decimals, or "n/a" where it is absent.
pub(crate) fn cell(value: &Value, digits: usize) -> String {
    match value.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "n/a".to_string(),
    }
}

/// The graft / reference table of `report["rows"]`, each row with its own decimals
/// (`digits`).
pub(crate) fn ratio_table(report: &Value) -> String {
    let mut table = String::from(
        "| metric | graft | PyTorch + PEFT | graft / reference |\n| --- | ---: | ---: | ---: |\n",
    );
    for row in report["rows"].as_array().into_iter().flatten() {
        let digits = row["digits"].as_u64().unwrap_or(0) as usize;
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row["metric"].as_str().unwrap_or_default(),
            cell(&row["graft"], digits),
            cell(&row["reference"], digits),
            cell(&row["ratio"], 2),
        ));
    }
    table
}

/// "`COMMAND` on MACHINE (DATE)", where a reference table was measured.
pub(crate) fn measured_on(report: &Value) -> String {
    format!(
        "`{}` on {} ({})",
        report["command"].as_str().unwrap_or_default(),
        report["machine"].as_str().unwrap_or_default(),
        report["date"].as_str().unwrap_or_default(),
    )
}

/// "graft's products on ... Reference: torch ..., N threads": what each side ran on.
pub(crate) fn software(report: &Value) -> String {
    let versions = &report["reference_versions"];
    format!(
        "graft's products on {}. Reference: torch {}, transformers {}, peft {}, {} threads",
        report["graft_matmul"].as_str().unwrap_or("?"),
        versions["torch"].as_str().unwrap_or("?"),
        versions["transformers"].as_str().unwrap_or("?"),
        versions["peft"].as_str().unwrap_or("?"),
        report["threads"],
    )
}

fn reference_markdown(report: &Value) -> String {
    let mut table = format!(
        "{}; LoRA r=8 on query/value, {} training steps of 8 x up to 128 tokens, inference at 32 \
         x 128 tokens; median of {} alternating rounds; {}, fp32.\n\n",
        measured_on(report),
        report["steps"],
        report["rounds"],
        software(report),
    );
    table.push_str(&ratio_table(report));
    let rss = &report["reference_peak_rss_mb"];
    table.push_str(&format!(
        "\ngraft's peak RSS covers training and its final evaluation in one process; the \
         reference's is the larger of its training ({} MiB) and inference ({} MiB) processes.\n",
        cell(&rss["train"], 0),
        cell(&rss["infer"], 0),
    ));
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_uses_the_rounds_that_reported() {
        assert_eq!(median(&[Some(3.0), None, Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(median(&[Some(1.0), Some(4.0)]), Some(2.5));
        assert_eq!(median(&[None, None]), None);
    }

    #[test]
    fn missing_graft_inference_keys_read_n_a() {
        let report = json!({
            "command": "cargo xtask bench --reference --steps 4 --rounds 1",
            "steps": 4, "rounds": 1, "threads": 2,
            "reference_versions": { "torch": "2.15.0" },
            "reference_peak_rss_mb": { "train": 1071.0, "infer": 1030.0 },
            "rows": [
                { "metric": "inference tokens/s", "graft": null, "reference": 6923.1, "ratio": null },
                { "metric": "train s/step (median)", "digits": 3, "graft": 2.33, "reference": 0.3, "ratio": 7.77 },
            ],
        });
        let table = reference_markdown(&report);
        assert!(
            table.contains("| inference tokens/s | n/a | 6923 | n/a |"),
            "{table}"
        );
        assert!(
            table.contains("| train s/step (median) | 2.330 | 0.300 | 7.77 |"),
            "{table}"
        );
    }
}
