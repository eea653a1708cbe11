//! Every kind of bad input gets a clear error: a non-zero exit, a message naming the file and
//! the place in it, no panic, and nothing written over existing outputs.
use graft_peft::candle::{Device, Tensor};
use graft_testkit as testkit;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::{graft, stderr};

const HEADER: &str = "uuid,title,author,abstract,Keywords,label\n";
const ROWS: &str = "1,A title,,An abstract.,,1\n2,Another,,More text.,,0\n";

/// Runs graft with `args` plus `--out OUT`, where OUT already holds a file; asserts a clean
/// failure naming every needle, and that OUT holds exactly what it held before.
fn assert_refused(case: &str, args: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("earlier.txt"), "an earlier result").unwrap();
    let mut full: Vec<&str> = args.to_vec();
    let out_arg = out.display().to_string();
    full.extend(["--out", &out_arg]);
    let result = graft(&full);
    let message = stderr(&result);
    assert!(
        !result.status.success(),
        "{case}: succeeded on bad input\n{message}"
    );
    assert!(!message.contains("panicked"), "{case}: {message}");
    for needle in needles {
        assert!(
            message.contains(needle),
            "{case}: `{needle}` is not in the message:\n{message}"
        );
    }
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["earlier.txt"], "{case}: wrote into --out");
    assert_eq!(
        std::fs::read_to_string(out.join("earlier.txt")).unwrap(),
        "an earlier result",
        "{case}"
    );
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn train_on(data: &str) -> Vec<&str> {
    vec![
        "train",
        "--method",
        "lora",
        "--max-steps",
        "1",
        "--data",
        data,
    ]
}

#[test]
fn malformed_data_files_name_the_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let long = "x".repeat(graft_trainer::data::MAX_FIELD_BYTES + 1);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "missing column",
            write(d, "no_abstract.csv", "uuid,title,label\n1,A title,1\n"),
            vec!["no_abstract.csv", "row 1", "\"abstract\""],
        ),
        (
            "duplicated column",
            write(
                d,
                "twice.csv",
                "uuid,title,title,author,abstract,Keywords,label\n1,a,b,,c,,1\n",
            ),
            vec!["twice.csv", "\"title\"", "appears twice"],
        ),
        (
            "unbalanced quote",
            write(
                d,
                "quote.csv",
                format!(
                    "{HEADER}1,Fine,,An abstract.,,1\n2,\"Broken,,Another.,,0\n3,More,,Text.,,1\n"
                ),
            ),
            vec!["quote.csv", "row 3", "quote"],
        ),
        (
            "ragged row",
            write(
                d,
                "ragged.csv",
                format!("{HEADER}1,A,,Text.,,1\n2,B,,Text.,1\n"),
            ),
            vec!["ragged.csv", "row 3", "6", "5"],
        ),
        (
            "empty file",
            write(d, "empty.csv", ""),
            vec!["empty.csv", "empty"],
        ),
        (
            "header only",
            write(d, "header.csv", HEADER),
            vec!["header.csv", "no data rows"],
        ),
        (
            "non-UTF-8 bytes",
            write(
                d,
                "latin1.csv",
                [HEADER.as_bytes(), b"1,Caf\xe9,,Text.,,1\n"].concat(),
            ),
            vec!["latin1.csv", "row 2", "\"title\"", "UTF-8"],
        ),
        (
            "label outside the label set",
            write(
                d,
                "label.csv",
                format!("{HEADER}1,A,,Abstract one.,,1\n2,B,,Abstract two.,,medical\n"),
            ),
            vec!["label.csv", "row 3", "label", "medical"],
        ),
        (
            "empty text fields",
            write(d, "blank.csv", format!("{HEADER}1,,,,,1\n{ROWS}")),
            vec!["blank.csv", "row 2", "expected some text"],
        ),
        (
            "extremely long field",
            write(d, "long.csv", format!("{HEADER}1,A,,{long},,1\n{ROWS}")),
            vec!["long.csv", "row 2", "\"abstract\"", "bytes"],
        ),
        (
            "JSONL syntax",
            write(
                d,
                "syntax.jsonl",
                "{\"title\": \"A\", \"abstract\": \"B\", \"label\": 1}\n{\"title\": \"A\",\n",
            ),
            vec!["syntax.jsonl", "line 2"],
        ),
        (
            "JSONL line that is no object",
            write(d, "array.jsonl", "[1, 2]\n"),
            vec!["array.jsonl", "line 1", "an array"],
        ),
        (
            "JSONL missing key",
            write(d, "key.jsonl", "{\"title\": \"A\", \"label\": \"1\"}\n"),
            vec!["key.jsonl", "line 1", "\"abstract\""],
        ),
        (
            "JSONL value that is no text",
            write(
                d,
                "value.jsonl",
                "{\"title\": \"A\", \"abstract\": [\"B\"], \"label\": \"1\"}\n",
            ),
            vec!["value.jsonl", "line 1", "\"abstract\"", "an array"],
        ),
    ];
    for (case, path, needles) in &cases {
        assert_refused(case, &train_on(path), needles);
    }
}

#[test]
fn bad_training_configs_name_the_file_and_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = |name: &str, body: &str| write(d, name, body);
    let cases = [
        (
            "unknown key",
            config("typo.toml", "[train]\nlrr = 0.1\n"),
            vec!["typo.toml", "lrr", "did you mean `lr`"],
        ),
        (
            "wrong type",
            config("type.toml", "[train]\nbatch_size = \"eight\"\n"),
            vec!["type.toml", "batch_size"],
        ),
        (
            "r = 0",
            config("rank.toml", "[method]\nname = \"lora\"\nr = 0\n"),
            vec!["lora", "r must be at least 1"],
        ),
        (
            "negative learning rate",
            config("lr.toml", "[train]\nlr = -0.001\n"),
            vec!["lr.toml", "train.lr must be positive", "-0.001"],
        ),
        (
            "batch size 0",
            config("batch.toml", "[train]\nbatch_size = 0\n"),
            vec!["batch.toml", "train.batch_size"],
        ),
        (
            "method key typo",
            config("alpha.toml", "[method]\nname = \"lora\"\nlora_alhpa = 16\n"),
            vec!["lora_alhpa", "did you mean `lora_alpha`"],
        ),
        (
            "target_modules matching nothing",
            config(
                "targets.toml",
                "[method]\nname = \"lora\"\ntarget_modules = [\"q_proj\"]\n",
            ),
            vec!["q_proj", "matches no linear site", "attention.self.query"],
        ),
    ];
    let demo = testkit::workspace_root()
        .join("data/demo.csv")
        .display()
        .to_string();
    for (case, path, needles) in &cases {
        let mut args = train_on(&demo);
        args.retain(|a| *a != "--method" && *a != "lora");
        args.extend(["--config", path]);
        assert_refused(case, &args, needles);
    }
}

/// A copy of MiniLM's folder in which `edit` has broken something.
fn broken_model(root: &Path, name: &str, edit: impl FnOnce(&Path)) -> String {
    let source = testkit::minilm_dir().unwrap();
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    edit(&dir);
    dir.display().to_string()
}

#[test]
fn broken_model_folders_name_the_file_and_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let weights = |dir: &Path| dir.join("model.safetensors");
    let cases = [
        (
            "missing config.json",
            broken_model(d, "no_config", |m| {
                std::fs::remove_file(m.join("config.json")).unwrap()
            }),
            vec!["config.json"],
        ),
        (
            "missing tokenizer.json",
            broken_model(d, "no_tokenizer", |m| {
                std::fs::remove_file(m.join("tokenizer.json")).unwrap()
            }),
            vec!["tokenizer.json"],
        ),
        (
            "missing weights",
            broken_model(d, "no_weights", |m| {
                std::fs::remove_file(weights(m)).unwrap()
            }),
            vec!["model.safetensors"],
        ),
        (
            "truncated safetensors",
            broken_model(d, "truncated", |m| {
                let bytes = std::fs::read(weights(m)).unwrap();
                std::fs::write(weights(m), &bytes[..bytes.len() / 2]).unwrap();
            }),
            vec!["model.safetensors"],
        ),
        (
            "tensor of unexpected shape",
            broken_model(d, "shape", |m| {
                let mut tensors: HashMap<String, Tensor> =
                    graft_peft::candle::safetensors::load(weights(m), &Device::Cpu).unwrap();
                tensors.insert(
                    "encoder.layer.0.attention.self.query.weight".into(),
                    Tensor::zeros((384, 100), graft_peft::candle::DType::F32, &Device::Cpu)
                        .unwrap(),
                );
                graft_peft::candle::safetensors::save(&tensors, weights(m)).unwrap();
            }),
            vec![
                "model.safetensors",
                "encoder.layer.0.attention.self.query.weight",
                "[384, 100]",
            ],
        ),
        (
            "tensor of unexpected dtype",
            broken_model(d, "dtype", |m| {
                let mut tensors: HashMap<String, Tensor> =
                    graft_peft::candle::safetensors::load(weights(m), &Device::Cpu).unwrap();
                let key = "encoder.layer.1.output.dense.bias";
                let ints = tensors[key]
                    .to_dtype(graft_peft::candle::DType::U8)
                    .unwrap();
                tensors.insert(key.into(), ints);
                graft_peft::candle::safetensors::save(&tensors, weights(m)).unwrap();
            }),
            vec![
                "model.safetensors",
                "encoder.layer.1.output.dense.bias",
                "U8",
            ],
        ),
        (
            "unknown architecture",
            broken_model(d, "gpt2", |m| {
                let text = std::fs::read_to_string(m.join("config.json")).unwrap();
                let text = text.replace("\"model_type\": \"bert\"", "\"model_type\": \"gpt2\"");
                std::fs::write(m.join("config.json"), text).unwrap();
            }),
            vec!["config.json", "model_type `gpt2`"],
        ),
    ];
    let demo = testkit::workspace_root()
        .join("data/demo.csv")
        .display()
        .to_string();
    for (case, model, needles) in &cases {
        let mut needles = needles.clone();
        needles.push(model.rsplit('/').next().unwrap());
        let args = [train_on(&demo), vec!["--model", model]].concat();
        assert_refused(case, &args, &needles);
    }
}

/// Trains a tiny LoRA adapter on the demo set; returns its folder.
fn trained_adapter(root: &Path) -> PathBuf {
    let run = root.join("run");
    let out = graft(&[
        "train",
        "--method",
        "lora",
        "--max-steps",
        "2",
        "--data",
        "data/demo.csv",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    run.join("adapter")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn adapters_that_do_not_fit_their_config_or_model_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = trained_adapter(dir.path());
    let broken = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let path = dir.path().join(name);
        copy_dir(&good, &path);
        edit(&path);
        path.display().to_string()
    };
    let weights = |a: &Path| a.join("adapter_model.safetensors");
    let edit_tensors = |a: &Path, f: &dyn Fn(&mut HashMap<String, Tensor>)| {
        let mut tensors = graft_peft::candle::safetensors::load(weights(a), &Device::Cpu).unwrap();
        f(&mut tensors);
        graft_peft::candle::safetensors::save(&tensors, weights(a)).unwrap();
    };
    let query_a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight";
    let cases = [
        (
            "rank in the config differs from the tensors",
            broken("rank", &|a| {
                let path = a.join("adapter_config.json");
                let mut config: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                config["r"] = serde_json::json!(16);
                std::fs::write(&path, config.to_string()).unwrap();
            }),
            vec![query_a, "[16, 384]"],
        ),
        (
            "missing key",
            broken("missing", &|a| {
                edit_tensors(a, &|t| {
                    t.remove(query_a);
                })
            }),
            vec![query_a, "missing"],
        ),
        (
            "extra key",
            broken("extra", &|a| {
                edit_tensors(a, &|t| {
                    t.insert(
                        "base_model.model.bert.pooler.dense.lora_A.weight".into(),
                        Tensor::zeros((8, 384), graft_peft::candle::DType::F32, &Device::Cpu)
                            .unwrap(),
                    );
                })
            }),
            vec![
                "base_model.model.bert.pooler.dense.lora_A.weight",
                "do not use",
            ],
        ),
    ];
    for (case, adapter, needles) in &cases {
        let mut needles = needles.clone();
        needles.push(adapter.rsplit('/').next().unwrap());
        let args = ["eval", "--adapter", adapter, "--data", "data/demo.csv"];
        assert_refused(case, &args, &needles);
    }
}
