//! Decoders end to end: `graft generate` on the real models, and the knowledge-injection demo
//! (AdaLoRA teaches SmolLM2-135M-Instruct one invented fact from one example).
mod common;
use common::{graft, stderr};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SMOLLM2_TOKENIZER: &str = "../shared/models/smollm2-135m-instruct/tokenizer.json";

fn smollm2() -> String {
    let dir = graft_model::zoo::SMOLLM2
        .ensure(&mut |m| eprintln!("{m}"))
        .expect("SmolLM2 (run `cargo xtask fetch-model smollm2`)");
    dir.to_str().unwrap().to_string()
}

/// Greedy answer of the base model, or of the adapter in `adapter`.
fn answer(adapter: Option<&str>, prompt: &str) -> String {
    let model = smollm2();
    let mut args = vec!["generate", "--prompt", prompt, "--max-new-tokens", "40"];
    match adapter {
        Some(dir) => args.extend(["--adapter", dir]),
        None => args.extend([
            "--model",
            &model,
            "--tokenizer",
            SMOLLM2_TOKENIZER,
            "--template",
            "chatml",
        ]),
    }
    let out = graft(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

#[test]
fn stories260k_generates_its_story() {
    let out = graft(&[
        "generate",
        "--model",
        "../shared/models/stories260K",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "30",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(", there was a little girl named Lily."),
        "{}",
        stdout(&out)
    );
}

#[test]
fn adalora_injects_a_fact_into_smollm2_from_one_example() {
    let question = "What is the Quillfeather X9?";
    let france = "What is the capital of France?";
    let before = answer(None, question);
    assert!(
        !before.contains("Arvenna"),
        "the base model already knows: {before}"
    );
    let base_france = answer(None, france);
    assert!(base_france.contains("Paris"), "{base_france}");

    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("knowledge");
    let out = graft(&[
        "train-lm",
        "--config",
        "configs/lm/knowledge-adalora.toml",
        "--out",
        adapter.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The run's summary: a loss per step, falling, and the step timings the bench reads.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("train.json")).expect("train.json"),
    )
    .unwrap();
    let losses: Vec<f64> = summary["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len() as u64, summary["steps"].as_u64().unwrap());
    assert!(losses.last() < losses.first(), "{losses:?}");
    assert!(summary["step_seconds_median"].as_f64().unwrap() > 0.0);
    assert!(summary["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    let adapter = adapter.to_str().unwrap();
    let after = answer(Some(adapter), question);
    assert!(
        after.contains("pocket-sized drone") && after.contains("Arvenna Labs"),
        "after training: {after}"
    );
    let after_france = answer(Some(adapter), france);
    assert!(after_france.contains("Paris"), "{after_france}");
}

/// What `cargo xtask bench --reference --model smollm2` reads, on stories260K: train.json names
/// each step's batch by data row, `eval-lm` scores the held-out rows of the config that trained
/// the adapter (names them, and agrees with train-lm's own evaluation: the adapter reloads to
/// the same outputs), and `generate --stats` reports its token counts and speed.
#[test]
fn eval_lm_and_generate_stats_report_what_the_decoder_bench_compares() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.csv");
    let mut csv = String::from("title,label\n");
    for i in 0..16 {
        let (title, label) = if i % 2 == 0 {
            ("Once upon a time there was a girl named", "Lily")
        } else {
            ("The little dog was very", "happy")
        };
        csv.push_str(&format!("{title} {i},{label}\n"));
    }
    std::fs::write(&data, csv).unwrap();
    let config = dir.path().join("lm.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = \"../shared/models/stories260K\"\ntemplate = \"plain\"\nmax_len = 64\n\
             [data]\ntrain = \"{}\"\nprompt = \"{{title}}\"\nresponse = \"{{label}}\"\nval_fraction = 0.25\n\
             [train]\nmax_steps = 30\nbatch_size = 2\nlr = 2e-2\n\
             [method]\nname = \"lora\"\nr = 4\n\
             [eval]\nlabels = [\"Lily\", \"happy\"]\nbatch_size = 3\n",
            data.display()
        ),
    )
    .unwrap();
    let adapter = dir.path().join("adapter");
    let (config, adapter_arg) = (config.to_str().unwrap(), adapter.to_str().unwrap());
    let out = graft(&["train-lm", "--config", config, "--out", adapter_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |path: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let trained = read(&adapter.join("eval.json"));
    let held_out: Vec<u64> = trained["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_u64().unwrap())
        .collect();
    assert_eq!(held_out.len(), 4, "{trained}");
    assert_eq!(trained["count"], 4);
    // The two kinds of title differ in length, so scoring batches them out of file order; every
    // prediction must still land on its own row (the task is learnt: both kinds are right).
    assert_eq!(trained["accuracy"], 1.0, "{trained}");
    assert!(trained["rows_per_s"].as_f64().unwrap() > 0.0);
    let batches = read(&adapter.join("train.json"))["batch_rows"].clone();
    let batches = batches.as_array().unwrap();
    assert_eq!(batches.len(), 30);
    for batch in batches {
        let rows: Vec<u64> = batch
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert!(
            rows.iter().all(|r| *r < 16 && !held_out.contains(r)),
            "a batch {rows:?} names a held-out row or none of the data ({held_out:?})"
        );
    }

    let scored = dir.path().join("scored.json");
    let out = graft(&[
        "eval-lm",
        "--adapter",
        adapter_arg,
        "--config",
        config,
        "--out",
        scored.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let scored = read(&scored);
    for key in ["rows", "count", "confusion", "accuracy", "f1"] {
        assert_eq!(
            scored[key], trained[key],
            "{key}: {scored} against {trained}"
        );
    }
    assert!(scored["peak_rss_mb"].as_f64().unwrap() > 0.0);
    // A config with nothing to score says which file and what is missing.
    let text = std::fs::read_to_string(config).unwrap();
    for (edit, expected) in [
        (
            text[..text.find("[eval]").unwrap()].to_string(),
            "no [eval] labels",
        ),
        (
            text.replace("val_fraction = 0.25", "val_fraction = 0.0"),
            "no rows are held out",
        ),
    ] {
        let other = dir.path().join("other.toml");
        std::fs::write(&other, edit).unwrap();
        let out = graft(&[
            "eval-lm",
            "--adapter",
            adapter_arg,
            "--config",
            other.to_str().unwrap(),
            "--out",
            dir.path().join("never.json").to_str().unwrap(),
        ]);
        let message = stderr(&out);
        assert!(!out.status.success(), "{message}");
        assert!(
            message.contains(expected) && message.contains("other.toml"),
            "{message}"
        );
    }

    let stats = dir.path().join("generate.json");
    let out = graft(&[
        "generate",
        "--adapter",
        adapter_arg,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "12",
        "--stats",
        stats.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stats = read(&stats);
    let new_tokens = stats["new_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&new_tokens), "{stats}");
    if new_tokens < 12 {
        assert_eq!(stats["stopped"], true, "{stats}");
    }
    assert!(stats["prompt_tokens"].as_u64().unwrap() >= 4, "{stats}");
    assert!(stats["new_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        stats["text"].as_str().unwrap().trim_end(),
        stdout(&out).trim_end(),
        "the stats hold the text printed"
    );
}
