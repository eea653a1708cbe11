//! `graft train` with `model.pooling = "tokens"`: a token classifier trained on phrases marked
//! in text (the challenge's keywords in title + abstract), its marking reported, its adapter
//! PEFT's TOKEN_CLS, resumable to the same bytes, and refused by the commands that read one
//! label a row.
mod common;

use common::{graft, kill_after_checkpoint, resume_to_the_same_adapter, stderr};
use graft_testkit as testkit;
use std::path::{Path, PathBuf};

/// 40 training rows of `challenge_test.csv` (never a report row: every 5th, 0-based) in `dir`.
fn tagging_csv(dir: &Path) -> PathBuf {
    let source = testkit::workspace_root().join("../shared/data/abstracts/challenge_test.csv");
    let data = graft_trainer::data::Dataset::read_csv(&source, &["title", "abstract", "Keywords"])
        .unwrap();
    let column = |name: &str| data.column_index(name).unwrap();
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut csv = String::from("title,abstract,Keywords\n");
    for record in data
        .records
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 5 != 0)
        .map(|(_, r)| r)
        .take(40)
    {
        let field = |name: &str| quote(&record.fields[column(name)]);
        csv += &format!(
            "{},{},{}\n",
            field("title"),
            field("abstract"),
            field("Keywords")
        );
    }
    let path = dir.join("tagging.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

fn config(dir: &Path, checkpoint_every: usize) -> String {
    let path = dir.join("tagger.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[model]
pooling = "tokens"
max_len = 64
[data]
template = "{{title}}\n{{abstract}}"
phrase_column = "Keywords"
labels = ["O", "B", "I"]
val_fraction = 0.25
[train]
seed = 3
max_steps = 8
batch_size = 4
lr = 5e-3
eval_every = 4
log_every = 1
checkpoint_every = {checkpoint_every}
[method]
name = "lora"
r = 8
"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_token_classifier_trains_reports_its_marking_and_saves_token_cls() {
    let dir = tempfile::tempdir().unwrap();
    let data = tagging_csv(dir.path());
    let run = dir.path().join("run");
    let config = config(dir.path(), 0);
    let out = graft(&[
        "train",
        "--config",
        &config,
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("to tag tokens: 30 train / 10 held-out rows"),
        "{said}"
    );
    assert!(said.contains("entity precision"), "{said}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train.json")).unwrap()).unwrap();
    let marking = &report["marking"];
    assert_eq!(marking["rows"], 40);
    let (phrases, unmatched) = (
        marking["phrases"].as_u64().unwrap(),
        marking["unmatched"].as_u64().unwrap(),
    );
    // About half of the challenge's keywords stand verbatim in title and abstract.
    assert!(unmatched > 0 && unmatched < phrases, "{marking}");
    assert!(marking["spans_cut"].as_u64().unwrap() > 0, "{marking}");

    let adapter = run.join("adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["task_type"], "TOKEN_CLS");
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    assert!(best["token_accuracy"].as_f64().unwrap() > 0.5, "{best}");

    // The tagger as a keyword extractor, scored as the others are (on this file's report rows).
    let scored = graft(&[
        "keywords-eval",
        "--data",
        data.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&scored.stdout);
    assert!(scored.status.success(), "{}", stderr(&scored));
    assert!(said.starts_with("tagging: exact-match F1"), "{said}");
    assert!(said.contains("on 8 report rows"), "{said}");

    let refused = graft(&[
        "eval",
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let err = stderr(&refused);
    assert!(!refused.status.success());
    assert!(
        err.contains("labels every token") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn a_killed_tagging_run_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = tagging_csv(dir.path());
    let config = config(dir.path(), 2);
    let args = |run: &Path| {
        vec![
            "train".to_string(),
            "--config".into(),
            config.clone(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--out".into(),
            run.to_str().unwrap().into(),
        ]
    };
    let whole = dir.path().join("whole");
    let out = graft(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    let killed = dir.path().join("killed");
    kill_after_checkpoint(
        &args(&killed).iter().map(String::as_str).collect::<Vec<_>>(),
        &killed,
        2,
    );
    resume_to_the_same_adapter(
        "train",
        &whole,
        &killed,
        "adapter/adapter_model.safetensors",
    );
}
