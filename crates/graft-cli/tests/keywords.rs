//! Task 2 end to end: `graft keywords-eval` on the report rows of the challenge's test file,
//! `graft predict --submission` filling Keywords and label on the challenge's B file, and the
//! generative extractor trained by `graft train-lm` with the report rows held out.
use graft_testkit as testkit;
use graft_trainer::keywords::{is_report_row, parse_keywords, score::normalise, REPORT_EVERY};
use std::path::{Path, PathBuf};

mod common;
use common::{graft, stderr};

fn abstracts(file: &str) -> PathBuf {
    testkit::workspace_root()
        .join("../shared/data/abstracts")
        .join(file)
}

/// The first `count` rows of a CSV of the challenge, written to `out`.
fn head(file: &str, count: usize, out: &Path) -> Vec<csv::StringRecord> {
    let mut reader = csv::Reader::from_path(abstracts(file)).unwrap();
    let mut writer = csv::Writer::from_path(out).unwrap();
    writer.write_record(reader.headers().unwrap()).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().take(count).map(Result::unwrap).collect();
    for row in &rows {
        writer.write_record(row).unwrap();
    }
    writer.flush().unwrap();
    rows
}

fn args(list: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<String> {
    list.iter()
        .map(|a| a.as_ref().to_str().unwrap().to_string())
        .collect()
}

fn run(list: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let owned = args(list);
    let borrowed: Vec<&str> = owned.iter().map(String::as_str).collect();
    let out = graft(&borrowed);
    assert!(out.status.success(), "{owned:?}: {}", stderr(&out));
    out
}

/// `predict --submission` on rows of the B file with the PEFT LoRA fixture: uuid,Keywords,label
/// for every row, in the input's order, each with a label and at least one keyword (with
/// `from_text`: every one found in its paper's title or abstract).
fn check_submission(
    data: &Path,
    rows: &[csv::StringRecord],
    extra: &[&str],
    from_text: bool,
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let submission = dir.path().join("submission.csv");
    let fixture = testkit::fixture_dir("lora_minilm");
    let minilm = testkit::minilm_dir().unwrap();
    let mut list: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"predict",
        &"--adapter",
        &fixture,
        &"--model",
        &minilm,
        &"--data",
        &data,
        &"--out",
        &submission,
        &"--submission",
    ];
    for e in extra {
        list.push(e);
    }
    let out = run(&list);
    let mut reader = csv::Reader::from_path(&submission).unwrap();
    assert_eq!(
        reader.headers().unwrap(),
        vec!["uuid", "Keywords", "label"],
        "the challenge's columns"
    );
    let written: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(written.len(), rows.len());
    for (row, paper) in written.iter().zip(rows) {
        assert_eq!(&row[0], &paper[0], "uuids in the input's order");
        assert!(["0", "1"].contains(&&row[2]), "label {:?}", &row[2]);
        let keywords = parse_keywords(&row[1]);
        assert!(!keywords.is_empty(), "row {}: no keyword", &row[0]);
        assert_eq!(row[1].split("; ").count(), keywords.len(), "{:?}", &row[1]);
        if !from_text {
            continue;
        }
        let text = normalise(&format!("{} {}", &paper[1], &paper[3]));
        for keyword in &keywords {
            assert!(
                text.contains(&normalise(keyword)),
                "{keyword:?} is not in row {}'s title or abstract",
                &row[0]
            );
        }
    }
    stderr(&out)
}

#[test]
fn a_submission_for_the_b_file_has_a_label_and_keywords_on_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("testB-head.csv");
    let rows = head("challenge_testB.csv", 6, &data);
    check_submission(&data, &rows, &[], true);
}

#[test]
fn keywords_eval_scores_the_baseline_on_the_472_report_rows_only() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("keywords.json");
    let data = abstracts("challenge_test.csv");
    let out = run(&[&"keywords-eval", &"--data", &data, &"--out", &report]);
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        line.contains("exact-match F1") && line.contains("partial-match F1"),
        "{line}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["papers"], 472);
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 472);
    assert!(rows
        .iter()
        .all(|r| is_report_row(r["index"].as_u64().unwrap() as usize, REPORT_EVERY)));
    let exact = json["exact_f1"].as_f64().unwrap();
    let partial = json["partial_f1"].as_f64().unwrap();
    // A baseline that finds real keywords, far from both ends (0.155 / 0.397 on the training
    // rows when written).
    assert!((0.05..0.5).contains(&exact), "{exact}");
    assert!(partial > exact && partial < 0.8, "{partial}");
}

#[test]
fn the_generative_extractor_trains_without_the_report_rows_and_fills_a_submission() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("test-head.csv");
    head("challenge_test.csv", 12, &data);
    let config = dir.path().join("keywords.toml");
    let stories = testkit::stories260k_dir();
    std::fs::write(
        &config,
        format!(
            r#"
[model]
path = {stories:?}
template = "plain"
max_len = 512
[data]
train = {data:?}
prompt = "{{title}}. {{abstract}}"
response = "{{Keywords}}"
max_prompt_chars = 100
report_every = 5
[train]
max_steps = 3
batch_size = 2
lr = 1e-2
[method]
name = "lora"
r = 2
target_modules = ["q_proj", "v_proj"]
"#
        ),
    )
    .unwrap();
    let adapter = dir.path().join("adapter");
    let out = run(&[&"train-lm", &"--config", &config, &"--out", &adapter]);
    // Rows 0, 5 and 10 are report rows: 9 of the 12 pairs train.
    assert!(
        stderr(&out).contains(", 9 pairs (0 held out),"),
        "{}",
        stderr(&out)
    );
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("graft_lm_task.json")).unwrap())
            .unwrap();
    assert_eq!(task["prompt"]["template"], "{title}. {abstract}");
    assert_eq!(task["prompt"]["max_chars"], 100);

    let report = dir.path().join("keywords.json");
    run(&[
        &"keywords-eval",
        &"--data",
        &data,
        &"--adapter",
        &adapter,
        &"--max-new-tokens",
        &"6",
        &"--out",
        &report,
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["extractor"], "generative");
    let indices: Vec<u64> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 5, 10]);

    let testb = dir.path().join("testB-head.csv");
    let rows_b = head("challenge_testB.csv", 3, &testb);
    let log = check_submission(
        &testb,
        &rows_b,
        &["--keywords-adapter", adapter.to_str().unwrap()],
        false,
    );
    assert!(log.contains("generative extractor on 3 rows"), "{log}");
}
