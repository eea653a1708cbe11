//! THUDM's P-tuning v2 output (`ptuning/main.py`'s folder: `pytorch_model.bin` with the prefix
//! table, config.json with `pre_seq_len`) used as an adapter by the `graft` binary, on the tiny
//! ChatGLM2 of `../shared/fixtures/chatglm2_thudm` (see `../shared/fixtures/README.md`), whose
//! logits THUDM's own code computed. `GRAFT_CHATGLM_FIXTURE` names another folder made the same
//! way.
mod common;
use common::{graft, stderr};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    match std::env::var_os("GRAFT_CHATGLM_FIXTURE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/chatglm2_thudm"),
    }
}

/// What THUDM's code computed: the rows' ids, and the last position's logits of each row
/// without and with the prefix.
struct Expected {
    input_ids: Vec<Vec<u32>>,
    last: Vec<Vec<f32>>,
    last_with_prefix: Vec<Vec<f32>>,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let last = |key: &str| -> Vec<Vec<f32>> {
        let rows: Vec<Vec<Vec<f32>>> = serde_json::from_value(json[key].clone()).unwrap();
        rows.into_iter()
            .map(|r| r.last().unwrap().clone())
            .collect()
    };
    Expected {
        input_ids: serde_json::from_value(json["input_ids"].clone()).unwrap(),
        last: last("logits"),
        last_with_prefix: last("logits_with_prefix"),
    }
}

/// A tokenizer.json whose word `t<i>` is id `i`, for every id of the fixture's vocabulary (it
/// ships none): a prompt of such words is exactly the ids THUDM's run fed.
fn write_tokenizer(dir: &Path) -> PathBuf {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..512).map(|i| (format!("t{i}"), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": { "type": "WhitespaceSplit" },
        "post_processor": null,
        "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "t0" },
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `graft COMMAND` with THUDM's ptuning/ folder as the adapter on the fixture's base, the
/// tokenizer `tokenizer` and the plain template, then `rest`.
fn graft_with_thudms_prefix(
    command: &str,
    tokenizer: &Path,
    rest: &[&str],
) -> std::process::Output {
    let (fixture, ptuning) = (fixture(), fixture().join("ptuning"));
    let mut args = vec![
        command,
        "--adapter",
        ptuning.to_str().unwrap(),
        "--model",
        fixture.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--template",
        "plain",
    ];
    args.extend(rest);
    graft(&args)
}

/// What the issue asks of THUDM's prefix through graft: its logits within 1e-4 of THUDM's.
const TOLERANCE: f32 = 1e-4;

#[test]
fn graft_logits_with_thudms_ptuning_folder_gives_thudms_logits() {
    let scratch = tempfile::tempdir().unwrap();
    let tokenizer = write_tokenizer(scratch.path());
    let expected = expected();
    for (row, ids) in expected.input_ids.iter().enumerate() {
        let prompt: Vec<String> = ids.iter().map(|i| format!("t{i}")).collect();
        let out = scratch.path().join(format!("row{row}.json"));
        let run = graft_with_thudms_prefix(
            "logits",
            &tokenizer,
            &[
                "--prompt",
                &prompt.join(" "),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(run.status.success(), "{}", stderr(&run));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let ours: Vec<f32> = serde_json::from_value(report["logits"].clone()).unwrap();
        let diff = max_diff(&ours, &expected.last_with_prefix[row]);
        eprintln!("row {row}: within {diff:e} of THUDM's logits with the prefix");
        assert!(
            diff <= TOLERANCE,
            "row {row}: {diff} from THUDM's, over {TOLERANCE}"
        );
        // The prefix was applied: without it the logits are far from these.
        let moved = max_diff(&ours, &expected.last[row]);
        assert!(moved > 100.0 * TOLERANCE, "row {row}: moved by {moved}");
    }
}

#[test]
fn graft_generate_with_thudms_ptuning_folder_continues_as_thudms_model_does() {
    let scratch = tempfile::tempdir().unwrap();
    let tokenizer = write_tokenizer(scratch.path());
    // After THUDM's row 0's first two ids, the prefix turns the most likely next id from 159
    // into 342 (by 0.24 over the runner-up; expected.json's logits at position 1).
    let run = graft_with_thudms_prefix(
        "generate",
        &tokenizer,
        &["--prompt", "t419 t187", "--max-new-tokens", "1"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let text = String::from_utf8_lossy(&run.stdout);
    assert_eq!(text.trim(), "t342", "{text}");
}

/// `graft args` fails, saying each of `needles`.
fn fails_saying(args: &[&str], needles: &[&str]) {
    let run = graft(args);
    let err = stderr(&run);
    assert!(!run.status.success(), "{args:?} succeeded");
    for needle in needles {
        assert!(err.contains(needle), "{args:?}: no `{needle}` in {err}");
    }
}

#[test]
fn thudms_ptuning_folder_is_refused_clearly_where_it_cannot_apply() {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out.json");
    let out = out.to_str().unwrap();
    let ptuning = fixture().join("ptuning");
    let ptuning = ptuning.to_str().unwrap();
    fn args<'a>(adapter: &'a str, model: &'a str, out: &'a str) -> Vec<&'a str> {
        let mut args = vec![
            "logits",
            "--adapter",
            adapter,
            "--prompt",
            "t1",
            "--out",
            out,
        ];
        if !model.is_empty() {
            args.extend(["--model", model]);
        }
        args
    }
    let logits = |adapter, model| args(adapter, model, out);

    // No base named.
    fails_saying(
        &logits(ptuning, ""),
        &["does not name its base model", "--model"],
    );

    // A base of another shape: one layer more.
    let base = scratch.path().join("base");
    std::fs::create_dir(&base).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    config["num_layers"] = 3.into();
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    fails_saying(
        &logits(ptuning, base.to_str().unwrap()),
        &["`num_layers` is 2 here but 3 in the base", "another model"],
    );

    // A run with prefix_projection: its MLP is not read.
    let projected = scratch.path().join("projected");
    std::fs::create_dir(&projected).unwrap();
    std::fs::copy(
        fixture().join("ptuning/pytorch_model.bin"),
        projected.join("pytorch_model.bin"),
    )
    .unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("ptuning/config.json")).unwrap(),
    )
    .unwrap();
    config["prefix_projection"] = true.into();
    std::fs::write(projected.join("config.json"), config.to_string()).unwrap();
    fails_saying(
        &logits(projected.to_str().unwrap(), fixture().to_str().unwrap()),
        &["`prefix_projection` is true"],
    );

    // Classification commands need a head, which THUDM's prefix has not.
    let data = scratch.path().join("data.csv");
    std::fs::write(&data, "uuid,text\n1,t1\n").unwrap();
    fails_saying(
        &[
            "predict",
            "--adapter",
            ptuning,
            "--model",
            fixture().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out,
        ],
        &[
            "no classification head",
            "graft generate, logits or eval-lm",
        ],
    );
}
