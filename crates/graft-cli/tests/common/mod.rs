//! Running the built `graft` binary from integration tests.
#![allow(dead_code)] // each test file uses part of this
use graft_testkit as testkit;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Plugins are built beside the test binaries (`target/<profile>/deps`).
pub fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

/// `graft` with the workspace's plugins, run from the workspace root (`train` also gets
/// `--model` MiniLM unless it resumes or names a model).
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graft"));
    cmd.args(args)
        .arg("--plugin-dir")
        .arg(plugin_dir())
        .current_dir(testkit::workspace_root());
    if args[0] == "train" && !args.contains(&"--resume") && !args.contains(&"--model") {
        cmd.arg("--model").arg(testkit::minilm_dir().unwrap());
    }
    cmd
}

pub fn graft(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Compiles C `source` into a shared library `dir/lib<stem>.so`: a fake plugin, which the
/// loader sees as a library exporting whatever the source exports.
pub fn c_library(dir: &std::path::Path, stem: &str, source: &str) -> PathBuf {
    let source_file = dir.join(format!("{stem}.c"));
    std::fs::write(&source_file, source).unwrap();
    let library = dir.join(format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source_file)
        .status()
        .expect("a C compiler (cc) to build the fake plugin");
    assert!(status.success(), "cc failed on {}", source_file.display());
    library
}

/// Starts `graft args`, waits until the run in `run` has a checkpoint at step `min_step` or
/// later, and kills it with SIGKILL; returns that checkpoint's step.
pub fn kill_after_checkpoint(args: &[&str], run: &std::path::Path, min_step: usize) -> usize {
    kill_when(args, || latest_checkpoint(run).filter(|&s| s >= min_step))
}

/// The step of `run`'s newest checkpoint, if it has one.
pub fn latest_checkpoint(run: &std::path::Path) -> Option<usize> {
    let latest = run.join(graft_trainer::checkpoint::DIR).join("latest");
    let name = std::fs::read_to_string(latest).ok()?;
    name.trim().strip_prefix("step-")?.parse().ok()
}

/// Starts `graft args`, polls `ready` until it gives a value (within 120 s), kills the process
/// with SIGKILL and returns that value.
pub fn kill_when(args: &[&str], ready: impl Fn() -> Option<usize>) -> usize {
    let mut child = command(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let reached = loop {
        if let Some(value) = ready() {
            break value;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "the run never reached the point to kill it at"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    reached
}

/// Resumes the killed run `killed` with `graft <command> --resume`, checks that it says so, and
/// that its adapter file `adapter` (relative to each run folder) is byte for byte the
/// uninterrupted run `whole`'s.
pub fn resume_to_the_same_adapter(
    command: &str,
    whole: &std::path::Path,
    killed: &std::path::Path,
    adapter: &str,
) {
    let out = graft(&[command, "--resume", killed.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resuming after step"),
        "{}",
        stderr(&out)
    );
    let bytes = |run: &std::path::Path| std::fs::read(run.join(adapter)).unwrap();
    assert!(
        bytes(whole) == bytes(killed),
        "{command}: resumed to other adapter bytes"
    );
}

/// Checks that `graft <command> --resume run` (a run killed after a checkpoint, training on the
/// file `data`) refuses each edit of `data` in `edits` (new contents, and words the refusal
/// must hold), refuses the checkpoint once it lacks its record of the data (as an older
/// graft's), and resumes again once both are as they were.
pub fn resume_refuses_changed_data(
    command: &str,
    run: &std::path::Path,
    data: &std::path::Path,
    edits: &[(String, &str)],
) {
    let resume = || graft(&[command, "--resume", run.to_str().unwrap()]);
    let refused = |out: &Output, words: &str| {
        let err = stderr(out);
        assert!(!out.status.success(), "resumed on changed data: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let how_to_start_afresh = "without --resume, with a new --out";
        for needle in [
            "cannot resume from",
            "checkpoints/step-",
            how_to_start_afresh,
            words,
        ] {
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
    };
    let original = std::fs::read(data).unwrap();
    for (contents, words) in edits {
        std::fs::write(data, contents).unwrap();
        refused(&resume(), words);
    }
    std::fs::write(data, &original).unwrap();

    let latest = run.join(graft_trainer::checkpoint::DIR).join("latest");
    let name = std::fs::read_to_string(&latest).unwrap();
    let state_file = latest.with_file_name(name.trim()).join("state.json");
    let state = std::fs::read_to_string(&state_file).unwrap();
    let mut older: serde_json::Value = serde_json::from_str(&state).unwrap();
    older.as_object_mut().unwrap().remove("data").unwrap();
    std::fs::write(&state_file, older.to_string()).unwrap();
    refused(&resume(), "does not record the data its run trained on");
    std::fs::write(&state_file, state).unwrap();

    let out = resume();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming after step"));
}

/// A small LoRA run on the demo set, with dropout so that the RNG state matters on resume.
pub fn write_classifier_config(
    dir: &std::path::Path,
    steps: usize,
    lr: &str,
    checkpoint_every: usize,
    on_non_finite: &str,
) -> String {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[model]
max_len = 32
[data]
train = "data/demo.csv"
val_fraction = 0.25
[train]
seed = 7
max_steps = {steps}
batch_size = 4
lr = {lr}
eval_every = 5
log_every = 1
checkpoint_every = {checkpoint_every}
on_non_finite = "{on_non_finite}"
[method]
name = "lora"
r = 4
lora_dropout = 0.1
"#
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// A causal-LM run on stories260K: 16 story pairs as JSONL, a quarter held out (the held-out
/// loss picks the best adapter), LoRA with dropout.
pub fn write_lm_config(
    dir: &std::path::Path,
    steps: usize,
    lr: &str,
    on_non_finite: &str,
) -> String {
    let data = dir.join("pairs.jsonl");
    let starts = [
        "Once upon a time",
        "Lily liked to",
        "The sun was",
        "Tom saw a",
    ];
    let ends = [
        " big dog.",
        " little cat that ran away.",
        " red ball.",
        " tree.",
    ];
    let lines: Vec<String> = (0..16)
        .map(|i| {
            serde_json::json!({ "prompt": starts[i % 4], "response": ends[i / 4] }).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let path = dir.join("lm.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[model]
path = "../shared/models/stories260K"
template = "plain"
max_len = 32
[data]
train = "{}"
val_fraction = 0.25
[train]
seed = 3
max_steps = {steps}
batch_size = 2
grad_accum = 2
lr = {lr}
eval_every = 10
log_every = 10
checkpoint_every = 2
on_non_finite = "{on_non_finite}"
[method]
name = "lora"
r = 4
lora_dropout = 0.1
"#,
            data.display()
        ),
    )
    .unwrap();
    path.display().to_string()
}
