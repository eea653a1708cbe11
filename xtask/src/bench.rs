//! `cargo xtask bench`: every method trained for the same step budget, one process each, with
//! speed, memory and quality read back from the runs' eval.json.
use crate::{build, plugin_packages, root, run_graft};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

/// In-tree method names (`graft-plugin-<name>`).
fn all_methods() -> Result<Vec<String>> {
    Ok(plugin_packages()?
        .iter()
        .filter_map(|p| p.strip_prefix("graft-plugin-").map(str::to_string))
        .collect())
}

fn machine() -> String {
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

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn methods(selection: &str, steps: usize, out: Option<PathBuf>) -> Result<()> {
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
    let out = out.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from("runs").join(format!("bench-{secs}"))
    });
    build()?;
    let mut rows = Vec::new();
    for method in &methods {
        let run = out.join(method);
        eprintln!("bench: {method}, {steps} steps -> {}", run.display());
        run_graft(&[
            "train".into(),
            "--method".into(),
            method.clone(),
            "--config".into(),
            format!("configs/{method}.toml"),
            "--max-steps".into(),
            steps.to_string(),
            "--eval-every".into(),
            "0".into(),
            "--out".into(),
            run.display().to_string(),
        ])?;
        let path = root().join(&run).join("eval.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let eval: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        rows.push(json!({
            "method": method,
            "trainable_params": eval["trainable_params"],
            "total_params": eval["total_params"],
            "step_seconds_median": eval["step_seconds_median"],
            "train_tokens_per_s": eval["train_tokens_per_s"],
            "peak_rss_mb": eval["peak_rss_mb"],
            "f1": eval["f1"],
            "accuracy": eval["accuracy"],
        }));
    }
    let command = format!("cargo xtask bench --methods {selection} --steps {steps}");
    let report = json!({
        "command": command,
        "machine": machine(),
        "date": today(),
        "steps": steps,
        "rows": rows,
    });
    let table = markdown(&report);
    println!("{table}");
    let dir = root().join(&out);
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(dir.join("bench.md"), &table)?;
    eprintln!("written: {}/bench.json, bench.md", out.display());
    Ok(())
}

fn markdown(report: &Value) -> String {
    let mut table = format!(
        "`{}` on {} ({}); validation F1 after {} steps of 8 x 128 tokens.\n\n\
         | method | trainable params | fraction | s/step (median) | tokens/s | peak RSS (MiB) | validation F1 |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        report["command"].as_str().unwrap_or_default(),
        report["machine"].as_str().unwrap_or_default(),
        report["date"].as_str().unwrap_or_default(),
        report["steps"],
    );
    for row in report["rows"].as_array().into_iter().flatten() {
        let f = |key: &str| row[key].as_f64().unwrap_or(f64::NAN);
        table.push_str(&format!(
            "| {} | {} | {:.4}% | {:.2} | {:.0} | {:.0} | {:.4} |\n",
            row["method"].as_str().unwrap_or_default(),
            row["trainable_params"],
            100.0 * f("trainable_params") / f("total_params"),
            f("step_seconds_median"),
            f("train_tokens_per_s"),
            f("peak_rss_mb"),
            f("f1"),
        ));
    }
    table
}
