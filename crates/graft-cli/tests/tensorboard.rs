//! TensorBoard scalars: every value a run logs to metrics.jsonl reads back, under the common
//! names, with the `tensorboard` package's own readers (`tests/tensorboard_reader.py`), for the
//! classifier and the causal LM; a killed and resumed run's event file holds each step once.
//!
//! Needs Python with `tensorboard`: `$GRAFT_PYTHON`, else `python3` with `target/tb-site` on its
//! path, where `cargo xtask test` installs the package (pip `--target`) before the tests.
mod common;
use common::{
    graft, kill_when, latest_checkpoint, stderr, write_classifier_config, write_lm_config,
};
use std::path::Path;
use std::process::Command;

/// A Python with the `tensorboard` package (see `xtask/src/main.rs`).
fn python() -> Command {
    graft_testkit::python_with("tb-site", "tensorboard", "tensorboard==2.21.0")
}

/// A scalar: its tag, step and value.
type Scalar = (String, i64, f32);

/// What TensorBoard reads from `run`'s event files, and how many files there are.
fn read_back(run: &Path) -> (Vec<Scalar>, usize) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tensorboard_reader.py");
    let out = python().arg(script).arg(run).output().unwrap();
    assert!(out.status.success(), "the reader failed: {}", stderr(&out));
    let mut files = std::collections::BTreeSet::new();
    let scalars = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            files.insert(v["file"].as_str().unwrap().to_string());
            (
                v["tag"].as_str().unwrap().to_string(),
                v["step"].as_i64().unwrap(),
                v["value"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    (scalars, files.len())
}

/// What `run` logged to metrics.jsonl, as the scalars the event file should hold.
fn logged(run: &Path) -> Vec<Scalar> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .flat_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let step = v["step"].as_i64().unwrap();
            graft_trainer::tensorboard::scalars(&v)
                .into_iter()
                .map(move |(tag, value)| (tag, step, value))
        })
        .collect()
}

/// Checks that TensorBoard reads back from `run` exactly what it logged, each (tag, step)
/// once, in one file, with each of `tags` there.
fn reads_back_what_was_logged(run: &Path, tags: &[&str]) -> Vec<Scalar> {
    let (mut read, files) = read_back(run);
    assert_eq!(files, 1, "one event file per run");
    let mut expected = logged(run);
    read.sort_by(|a, b| a.partial_cmp(b).unwrap());
    expected.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut keys: Vec<(&String, i64)> = read.iter().map(|(tag, step, _)| (tag, *step)).collect();
    keys.dedup();
    assert_eq!(keys.len(), read.len(), "a (tag, step) written twice");
    assert_eq!(read, expected);
    for tag in tags {
        assert!(read.iter().any(|(t, _, _)| t == tag), "no `{tag}`");
    }
    read
}

const TRAIN_TAGS: [&str; 5] = [
    "train/loss",
    "train/learning_rate",
    "train/grad_norm",
    "train/tokens_per_sec",
    "train/peak_gb",
];

#[test]
fn a_classifier_run_s_logged_values_read_back_in_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    // Logging every step, evaluating at steps 3 and 6.
    let config = write_classifier_config(dir.path(), 6, "1e-3", 0, "stop");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("eval_every = 5", "eval_every = 3")).unwrap();
    let run = dir.path().join("run");
    let out = graft(&["train", "--config", &config, "--out", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut tags = TRAIN_TAGS.to_vec();
    tags.extend(["eval/f1", "eval/loss", "eval/accuracy"]);
    let read = reads_back_what_was_logged(&run, &tags);
    let losses = read
        .iter()
        .filter(|(tag, _, _)| tag == "train/loss")
        .count();
    assert_eq!(losses, 6, "a loss for each of the 6 steps");
}

#[test]
fn a_killed_and_resumed_train_lm_run_s_events_hold_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    // 60 steps, logging every step, a checkpoint every 2.
    let config = write_lm_config(dir.path(), 60, "5e-3", "stop");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("log_every = 10", "log_every = 1")).unwrap();
    let run = dir.path().join("run");
    let args = [
        "train-lm",
        "--config",
        &config,
        "--out",
        run.to_str().unwrap(),
    ];
    // Killed once it has logged a step past its newest checkpoint (from the 6th on), which the
    // resumed run logs again.
    let logged_past = || {
        let checkpoint = latest_checkpoint(&run).filter(|&s| s >= 6)?;
        // Read while the run writes: a line may be cut off.
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).ok()?;
        let last_logged = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
            .max()?;
        (last_logged as usize > checkpoint).then_some(checkpoint)
    };
    kill_when(&args, logged_past);
    let out = graft(&["train-lm", "--resume", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut tags = TRAIN_TAGS.to_vec();
    tags.push("eval/loss");
    let read = reads_back_what_was_logged(&run, &tags);
    let steps: Vec<i64> = read
        .iter()
        .filter(|(tag, _, _)| tag == "train/loss")
        .map(|(_, step, _)| *step)
        .collect();
    assert_eq!(steps, (1..=60).collect::<Vec<_>>());
}
