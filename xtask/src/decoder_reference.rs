//! `cargo xtask bench --reference --model smollm2`: graft's decoder recipe beside PyTorch +
//! Hugging Face PEFT (benches/reference/decoder_reference.py), alternated round by round.
//!
//! Each round runs, for each system, three processes (so that each peak RSS belongs to one
//! job): LoRA training on the recipe's batches, verbalizer scoring of the held-out rows, and
//! greedy generation with a KV cache. The reference trains on the batches graft trained on (the
//! data rows its train.json names), and scores and generates through the adapter graft trained
//! (PEFT reads graft's files): the two do the same work, and the same F1 and text show it.
use crate::bench::{
    bench_data, cell, decoder_config, default_out, fetched_model, machine, measured_on, median,
    ratio, ratio_table, read_json, read_toml, reference_python, software, today, write_report,
    DECODER_CONFIG,
};
use crate::{build, root, run_graft, Backend};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The user turn both systems continue, greedy, for the generation row.
const GENERATION_PROMPT: &str = "Write a short story about a robot who learns to paint.";
const NEW_TOKENS: usize = 64;
/// The reference's copy of SmolLM2 as a Hugging Face folder (converted once from the GGUF).
const REFERENCE_MODEL: &str = "target/reference-smollm2";

pub fn decoder_reference(steps: usize, rounds: usize, out: Option<PathBuf>) -> Result<()> {
    if rounds == 0 || steps == 0 {
        bail!("--rounds and --steps must be positive");
    }
    let out = out.unwrap_or_else(default_out);
    let out_dir = root().join(&out);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let python = reference_python(&["gguf"])?;
    build(Backend::Cpu)?;
    let recipe = read_toml(&root().join(DECODER_CONFIG))?;
    let train_config = out_dir.join("train.toml");
    std::fs::write(
        &train_config,
        toml::to_string(&decoder_config(&recipe, "lora", steps)?)?,
    )
    .with_context(|| format!("writing {}", train_config.display()))?;
    let recipe_json = out_dir.join("recipe.json");
    std::fs::write(&recipe_json, reference_recipe(&recipe)?.to_string())
        .with_context(|| format!("writing {}", recipe_json.display()))?;
    let data = bench_data()?;
    let reference = Reference {
        python,
        recipe: recipe_json,
        data: data.clone(),
    };
    reference.run(
        "prepare",
        &["--gguf".into(), gguf_file(&fetched_model("smollm2")?)?],
        &out_dir.join("reference-prepare.json"),
    )?;

    let mut per_round = Vec::new();
    for round in 1..=rounds {
        let adapter = out.join(format!("graft-round-{round}"));
        let adapter_arg = adapter.display().to_string();
        eprintln!("bench --reference --model smollm2: round {round}/{rounds}, graft");
        run_graft(
            Backend::Cpu,
            &[
                "train-lm".into(),
                "--config".into(),
                train_config.display().to_string(),
                "--out".into(),
                adapter_arg.clone(),
            ],
        )?;
        let graft_score = out_dir.join(format!("graft-round-{round}-score.json"));
        run_graft(
            Backend::Cpu,
            &[
                "eval-lm".into(),
                "--adapter".into(),
                adapter_arg.clone(),
                "--config".into(),
                DECODER_CONFIG.into(),
                "--out".into(),
                graft_score.display().to_string(),
            ],
        )?;
        let graft_generate = out_dir.join(format!("graft-round-{round}-generate.json"));
        run_graft(
            Backend::Cpu,
            &[
                "generate".into(),
                "--adapter".into(),
                adapter_arg.clone(),
                "--template".into(),
                "chatml".into(),
                "--prompt".into(),
                GENERATION_PROMPT.into(),
                "--max-new-tokens".into(),
                NEW_TOKENS.to_string(),
                "--stats".into(),
                graft_generate.display().to_string(),
            ],
        )?;
        let graft_train = root().join(&adapter).join("train.json");

        eprintln!("bench --reference --model smollm2: round {round}/{rounds}, PyTorch + PEFT");
        let file = |mode: &str| out_dir.join(format!("reference-round-{round}-{mode}.json"));
        let arg = |p: &Path| p.display().to_string();
        reference.run(
            "train",
            &["--graft-run".into(), arg(&graft_train)],
            &file("train"),
        )?;
        reference.run(
            "score",
            &[
                "--graft-run".into(),
                arg(&graft_score),
                "--adapter".into(),
                adapter_arg.clone(),
            ],
            &file("score"),
        )?;
        reference.run(
            "generate",
            &[
                "--adapter".into(),
                adapter_arg.clone(),
                "--prompt".into(),
                GENERATION_PROMPT.into(),
                "--max-new-tokens".into(),
                NEW_TOKENS.to_string(),
            ],
            &file("generate"),
        )?;
        per_round.push(json!({
            "round": round,
            "graft": {
                "train": read_json(&graft_train)?,
                "score": without(read_json(&graft_score)?, "rows"),
                "generate": read_json(&graft_generate)?,
            },
            "reference": {
                "train": read_json(&file("train"))?,
                "score": read_json(&file("score"))?,
                "generate": read_json(&file("generate"))?,
            },
        }));
    }
    let report = report(steps, rounds, &data, per_round);
    write_report(&out, &report, &markdown(&report))
}

/// The reference's Python and the files every mode reads.
struct Reference {
    python: PathBuf,
    recipe: PathBuf,
    data: PathBuf,
}

impl Reference {
    fn run(&self, mode: &str, args: &[String], out: &Path) -> Result<()> {
        let status = Command::new(&self.python)
            .current_dir(root())
            .arg("benches/reference/decoder_reference.py")
            .args(["--mode", mode, "--model", REFERENCE_MODEL])
            .arg("--recipe")
            .arg(&self.recipe)
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .arg("--out")
            .arg(out)
            .status()
            .with_context(|| {
                format!(
                    "running {} benches/reference/decoder_reference.py",
                    self.python.display()
                )
            })?;
        if !status.success() {
            bail!("the reference's {mode} run failed");
        }
        Ok(())
    }
}

/// The GGUF file in the folder graft fetched (or the file itself).
fn gguf_file(model: &Path) -> Result<String> {
    if model.is_file() {
        return Ok(model.display().to_string());
    }
    let entries =
        std::fs::read_dir(model).with_context(|| format!("reading {}", model.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok(path.display().to_string());
        }
    }
    bail!("{} holds no .gguf file", model.display())
}

/// What the reference needs of the recipe, read from the same TOML graft reads.
fn reference_recipe(recipe: &toml::Table) -> Result<Value> {
    let get = |table: &str, key: &str| -> Result<toml::Value> {
        recipe
            .get(table)
            .and_then(|t| t.get(key))
            .cloned()
            .with_context(|| format!("{DECODER_CONFIG} has no {table}.{key}"))
    };
    let json = |v: toml::Value| serde_json::to_value(v).map_err(anyhow::Error::from);
    Ok(json!({
        "system": json(get("model", "system")?)?,
        "max_len": json(get("model", "max_len")?)?,
        "prompt": json(get("data", "prompt")?)?,
        "response": json(get("data", "response")?)?,
        "max_prompt_chars": json(get("data", "max_prompt_chars")?)?,
        "r": json(get("method", "r")?)?,
        "lora_alpha": json(get("method", "lora_alpha")?)?,
        "target_modules": json(get("method", "target_modules")?)?,
        "lr": json(get("train", "lr")?)?,
        "weight_decay": json(get("train", "weight_decay")?)?,
        "max_grad_norm": json(get("train", "max_grad_norm")?)?,
        "labels": json(get("eval", "labels")?)?,
        "label_column": json(get("eval", "label_column")?)?,
    }))
}

fn without(mut value: Value, key: &str) -> Value {
    if let Some(object) = value.as_object_mut() {
        object.remove(key);
    }
    value
}

/// (metric, process, key, decimals) of each row: both systems report each key under the same
/// name.
const METRICS: [(&str, &str, &str, usize); 7] = [
    ("training tokens/s", "train", "train_tokens_per_s", 0),
    (
        "training s/step (median)",
        "train",
        "step_seconds_median",
        2,
    ),
    ("scoring rows/s", "score", "rows_per_s", 2),
    ("generation tokens/s", "generate", "new_tokens_per_s", 1),
    ("peak RSS, training (MiB)", "train", "peak_rss_mb", 0),
    ("peak RSS, scoring (MiB)", "score", "peak_rss_mb", 0),
    ("peak RSS, generation (MiB)", "generate", "peak_rss_mb", 0),
];

fn report(steps: usize, rounds: usize, data: &Path, per_round: Vec<Value>) -> Value {
    let over_rounds = |system: &str, process: &str, key: &str| -> Option<f64> {
        let values: Vec<Option<f64>> = per_round
            .iter()
            .map(|r| r[system][process][key].as_f64())
            .collect();
        median(&values)
    };
    let rows: Vec<Value> = METRICS
        .iter()
        .map(|(name, process, key, digits)| {
            let graft = over_rounds("graft", process, key);
            let reference = over_rounds("reference", process, key);
            json!({ "metric": name, "digits": digits, "graft": graft, "reference": reference, "ratio": ratio(graft, reference) })
        })
        .collect();
    // The two did the same work: the same first loss (same batch, same weights, B = 0), the
    // same F1 through the same adapter, the same greedy text.
    let checks: Vec<Value> = per_round
        .iter()
        .map(|r| {
            let first = |system: &str| r[system]["train"]["losses"][0].as_f64();
            json!({
                "round": r["round"],
                "first_loss": [first("graft"), first("reference")],
                "f1": [r["graft"]["score"]["f1"], r["reference"]["score"]["f1"]],
                "same_text": r["graft"]["generate"]["text"] == r["reference"]["generate"]["text"],
            })
        })
        .collect();
    let first = &per_round[0];
    json!({
        "command": format!("cargo xtask bench --reference --model smollm2 --steps {steps} --rounds {rounds}"),
        "machine": machine(),
        "date": today(),
        "steps": steps,
        "rounds": rounds,
        "data": data.display().to_string(),
        "graft_matmul": first["graft"]["train"]["matmul"],
        "reference_versions": first["reference"]["train"]["versions"],
        "threads": first["reference"]["train"]["threads"],
        "scored_rows": first["graft"]["score"]["count"],
        "rows": rows,
        "checks": checks,
        "per_round": per_round,
    })
}

fn markdown(report: &Value) -> String {
    let mut table = format!(
        "{}; SmolLM2-135M-Instruct in f32, LoRA r=8 on q_proj/v_proj, {} training steps of batch \
         4 ({DECODER_CONFIG}), verbalizer scoring of {} held-out rows at batch 8, greedy \
         generation of {NEW_TOKENS} tokens; median of {} alternating rounds, each job in its own \
         process; {}.\n\n",
        measured_on(report),
        report["steps"],
        report["scored_rows"],
        report["rounds"],
        software(report),
    );
    table.push_str(&ratio_table(report));
    table.push_str("\nSame work on both sides, round by round (first training loss, F1 through graft's adapter, greedy text equal):\n\n");
    for check in report["checks"].as_array().into_iter().flatten() {
        table.push_str(&format!(
            "- round {}: first loss {} / {}, F1 {} / {}, same text: {}\n",
            check["round"],
            cell(&check["first_loss"][0], 4),
            cell(&check["first_loss"][1], 4),
            cell(&check["f1"][0], 4),
            cell(&check["f1"][1], 4),
            check["same_text"],
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference reads its recipe from the TOML graft trains with: every key it needs is
    /// there, with the recipe's values.
    #[test]
    fn the_reference_recipe_comes_from_the_decoder_config() {
        let recipe = read_toml(&root().join(DECODER_CONFIG)).unwrap();
        let json = reference_recipe(&recipe).unwrap();
        assert_eq!(json["target_modules"], json!(["q_proj", "v_proj"]));
        assert_eq!(json["labels"], json!(["0", "1"]));
        assert_eq!(json["max_prompt_chars"], 600);
        assert_eq!(json["prompt"], "{title}. {abstract}");
        assert_eq!(
            json["system"].as_str(),
            recipe["model"]["system"].as_str(),
            "{json}"
        );
        let mut without_eval = recipe.clone();
        without_eval.remove("eval");
        let err = reference_recipe(&without_eval).unwrap_err().to_string();
        assert!(err.contains("eval.labels"), "{err}");
    }

    /// Rows are medians over the rounds that reported, ratios graft over reference, and the
    /// checks say round by round whether the two did the same work.
    #[test]
    fn the_report_takes_medians_and_says_whether_both_did_the_same_work() {
        let round = |n: u64, graft_rate: f64, reference_rate: f64, same: &str| {
            let process = |rate: f64, text: &str| {
                json!({
                    "train": { "train_tokens_per_s": rate, "losses": [4.5, 1.0], "peak_rss_mb": 100.0, "matmul": "m", "versions": {}, "threads": 2 },
                    "score": { "rows_per_s": 5.0, "f1": 0.9, "count": 538, "peak_rss_mb": 50.0 },
                    "generate": { "new_tokens_per_s": 20.0, "text": text, "peak_rss_mb": 40.0 },
                })
            };
            json!({ "round": n, "graft": process(graft_rate, "a"), "reference": process(reference_rate, same) })
        };
        let report = report(
            10,
            3,
            Path::new("data.csv"),
            vec![
                round(1, 300.0, 200.0, "a"),
                round(2, 330.0, 300.0, "a"),
                round(3, 360.0, 250.0, "b"),
            ],
        );
        assert_eq!(report["rows"][0]["graft"], 330.0);
        assert_eq!(report["rows"][0]["reference"], 250.0);
        assert_eq!(report["rows"][0]["ratio"], 330.0 / 250.0);
        // The seconds per step were not reported: n/a, not zero.
        assert!(report["rows"][1]["graft"].is_null());
        let checks = report["checks"].as_array().unwrap();
        assert_eq!(checks[0]["same_text"], true);
        assert_eq!(checks[2]["same_text"], false);
        let table = markdown(&report);
        assert!(
            table.contains("| training tokens/s | 330 | 250 | 1.32 |"),
            "{table}"
        );
        assert!(
            table.contains("| training s/step (median) | n/a | n/a | n/a |"),
            "{table}"
        );
        assert!(
            table.contains(
                "round 3: first loss 4.5000 / 4.5000, F1 0.9000 / 0.9000, same text: false"
            ),
            "{table}"
        );
    }
}
