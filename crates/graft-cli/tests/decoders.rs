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
