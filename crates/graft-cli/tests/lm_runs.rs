//! `graft train-lm` runs through the one training loop: a killed run resumes to the same
//! adapter bytes (dropout on, the best adapter kept by held-out loss), a run that skipped
//! non-finite steps resumes with them counted, and the reports have the classifier's shape.
mod common;
use common::{
    graft, kill_after_checkpoint, resume_refuses_changed_data, resume_to_the_same_adapter, stderr,
    write_lm_config,
};
use std::path::Path;

fn train_lm(config: &str, out: &Path) -> std::process::Output {
    graft(&[
        "train-lm",
        "--config",
        config,
        "--out",
        out.to_str().unwrap(),
    ])
}

fn read(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Kills a run between checkpoints, resumes it, and compares with an uninterrupted run.
fn killed_and_resumed_matches_whole(config: &str, dir: &Path, steps: usize) -> serde_json::Value {
    let whole = dir.join("whole");
    let out = train_lm(config, &whole);
    assert!(out.status.success(), "{}", stderr(&out));
    let killed = dir.join("killed");
    let reached = kill_after_checkpoint(
        &[
            "train-lm",
            "--config",
            config,
            "--out",
            killed.to_str().unwrap(),
        ],
        &killed,
        4,
    );
    assert!(reached < steps, "the run finished before it was killed");
    assert!(!killed.join("train.json").exists(), "the run finished");
    resume_to_the_same_adapter("train-lm", &whole, &killed, "adapter_model.safetensors");
    let (a, b) = (
        read(&whole.join("eval.json")),
        read(&killed.join("eval.json")),
    );
    for key in ["best_step", "loss", "skipped_steps"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    // Every evaluation's step and held-out loss (not its time).
    let losses = |eval: &serde_json::Value| -> Vec<(serde_json::Value, serde_json::Value)> {
        eval["evaluations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["step"].clone(), e["metrics"]["loss"].clone()))
            .collect()
    };
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(
        read(&whole.join("train.json"))["losses"],
        read(&killed.join("train.json"))["losses"]
    );
    a
}

#[test]
fn a_killed_train_lm_run_resumes_to_the_byte_identical_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 100;
    let config = write_lm_config(dir.path(), steps, "5e-3", "stop");
    let eval = killed_and_resumed_matches_whole(&config, dir.path(), steps);
    // The classifier's shape: the best evaluation's metrics and step, every evaluation, the
    // skipped steps, the run's speed.
    // Every 10 steps and at each epoch's end (12 training pairs, 4 a step).
    let evaluated: Vec<u64> = eval["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=steps as u64)
        .filter(|s| s % 10 == 0 || s % 3 == 0)
        .collect();
    assert_eq!(evaluated, expected);
    let best = eval["best_step"].as_u64().unwrap();
    assert_eq!(eval["step"].as_u64(), Some(best));
    assert!(eval["loss"].as_f64().unwrap() > 0.0);
    assert_eq!(eval["skipped_steps"], serde_json::json!([]));
    for key in ["train_tokens_per_s", "step_seconds_median", "peak_rss_mb"] {
        assert!(eval[key].as_f64().unwrap() > 0.0, "{key}: {eval}");
    }
}

#[test]
fn a_train_lm_run_that_skipped_non_finite_steps_resumes_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 100;
    // At 1e30 the first update overflows what the next steps compute: their losses are NaN.
    let config = write_lm_config(dir.path(), steps, "1e30", "skip");
    let eval = killed_and_resumed_matches_whole(&config, dir.path(), steps);
    let skipped = eval["skipped_steps"].as_array().unwrap();
    assert!(skipped.len() > steps / 2, "{eval}");

    // With the stop policy the run ends at the first NaN step and names it.
    let config = write_lm_config(dir.path(), steps, "1e30", "stop");
    let out = train_lm(&config, &dir.path().join("stopped"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at step"), "{}", stderr(&out));
}

/// `--random-init`: a model built from its config alone (a ChatGLM and a Llama shape of about
/// 90 M parameters, stories260K's tokenizer) trains 2 steps in bf16 with finite losses near
/// ln(vocab), and the process never holds much more than the bf16 weights: the bound (over the
/// resident memory before the model, the weights plus a quarter plus 48 MiB) is below what an
/// f32 copy of the model beside them (4 bytes a parameter, twice the bf16 weights) would add.
/// Measured: 223 MiB peak for 167 MiB of weights, under a bound of 271; with the weights drawn
/// in f32 and converted, 411.
#[test]
fn a_model_built_from_its_config_alone_trains_in_its_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({ "prompt": format!("Once upon a time {i}"), "response": " there was a dog." })
                .to_string()
        })
        .collect();
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let config = dir.path().join("lm.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ntokenizer = \"../shared/models/stories260K/tokenizer.json\"\ntemplate = \"plain\"\nmax_len = 32\n\
             [data]\ntrain = \"{}\"\n\
             [train]\nmax_steps = 2\nbatch_size = 2\nlr = 1e-3\ncheckpoint_every = 0\n\
             [method]\nname = \"lora\"\nr = 4\n",
            pairs.display()
        ),
    )
    .unwrap();
    let shapes = [
        serde_json::json!({
            "model_type": "chatglm", "num_layers": 2, "padded_vocab_size": 32000,
            "hidden_size": 1024, "ffn_hidden_size": 2816, "kv_channels": 64,
            "num_attention_heads": 16, "multi_query_attention": true, "multi_query_group_num": 2,
            "seq_length": 256, "add_qkv_bias": true,
        }),
        serde_json::json!({
            "model_type": "llama", "vocab_size": 32000, "hidden_size": 1024,
            "intermediate_size": 2816, "num_hidden_layers": 2, "num_attention_heads": 16,
            "num_key_value_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false, "hidden_act": "silu", "initializer_range": 0.02,
        }),
    ];
    for shape in shapes {
        let kind = shape["model_type"].as_str().unwrap().to_string();
        let shape_file = dir.path().join(format!("{kind}.json"));
        std::fs::write(&shape_file, shape.to_string()).unwrap();
        let run = dir.path().join(format!("run-{kind}"));
        let out = graft(&[
            "train-lm",
            "--config",
            config.to_str().unwrap(),
            "--random-init",
            shape_file.to_str().unwrap(),
            "--dtype",
            "bf16",
            "--out",
            run.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{kind}: {}", stderr(&out));
        let summary = read(&run.join("train.json"));
        let (plan, _) = graft_model::load::read_plan(&shape_file).unwrap();
        let params = plan.param_count() as f64;
        let vocab = plan.spec.vocab_size as f64;
        let losses: Vec<f64> = serde_json::from_value(summary["losses"].clone()).unwrap();
        assert_eq!(losses.len(), 2, "{kind}: {summary}");
        assert!(
            losses
                .iter()
                .all(|l| l.is_finite() && (l - vocab.ln()).abs() < 2.0),
            "{kind}: losses {losses:?}, ln(vocab) {}",
            vocab.ln()
        );
        assert_eq!(summary["random_init_seed"], 42, "{kind}");
        let mib = (1u64 << 20) as f64;
        let before = summary["rss_before_model_mb"].as_f64().unwrap();
        let peak = summary["peak_rss_mb"].as_f64().unwrap();
        let weights = 2.0 * params / mib;
        let bound = before + 1.25 * weights + 48.0;
        eprintln!("{kind}: {params} parameters ({weights:.0} MiB in bf16), RSS {before:.0} MiB before the model, peak {peak:.0} MiB, bound {bound:.0} MiB");
        assert!(
            2.0 * weights > bound - before - weights,
            "{kind}: the bound would not catch an f32 copy"
        );
        assert!(
            peak <= bound,
            "{kind}: peak RSS {peak:.0} MiB over {bound:.0} MiB"
        );
    }
}

#[test]
fn a_train_lm_resume_refuses_training_data_that_changed_since_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_lm_config(dir.path(), 100, "5e-3", "stop");
    let run = dir.path().join("run");
    kill_after_checkpoint(
        &[
            "train-lm",
            "--config",
            &config,
            "--out",
            run.to_str().unwrap(),
        ],
        &run,
        2,
    );
    // Cut to 4 rows (3 trained on, 1 held out): the saved order names rows past them, where
    // graft once panicked. Then 16 rows again, one response a word different.
    let data = dir.path().join("pairs.jsonl");
    let pairs = std::fs::read_to_string(&data).unwrap();
    let shrunk: String = pairs.lines().take(4).map(|l| format!("{l}\n")).collect();
    let edited = pairs.replacen("big dog", "big cat", 1);
    assert_ne!(edited, pairs);
    resume_refuses_changed_data(
        "train-lm",
        &run,
        &data,
        &[
            (shrunk, "12 training examples were read then and 3 now"),
            (edited, "the same number of examples, with other content"),
        ],
    );
}
