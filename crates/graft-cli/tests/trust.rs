//! What graft trusts and where it reads from: run and adapter folders work from any directory,
//! a resumed run loads no plugin its folder names, PEFT folders are read (or refused) field by
//! field, an unknown method is reported first, a missing OpenBLAS is said, and graft's own
//! OpenBLAS copy is fetched (pinned by hash) and used.
use graft_testkit as testkit;
use std::path::{Path, PathBuf};

mod common;
use common::{command, graft, stderr};

/// A small LoRA run config whose paths are relative to the folder it is run from.
fn write_relative_config(dir: &Path) {
    std::fs::write(
        dir.join("config.toml"),
        r#"
[model]
max_len = 32
[data]
train = "data.csv"
val_fraction = 0.25
[train]
seed = 3
max_steps = 4
batch_size = 4
eval_every = 0
checkpoint_every = 2
[method]
name = "lora"
r = 4
"#,
    )
    .unwrap();
}

/// A folder holding the demo data and a link to MiniLM, named relatively by its config.
fn relative_workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        testkit::workspace_root().join("data/demo.csv"),
        dir.path().join("data.csv"),
    )
    .unwrap();
    std::os::unix::fs::symlink(testkit::minilm_dir().unwrap(), dir.path().join("model")).unwrap();
    write_relative_config(dir.path());
    dir
}

/// Trains in a fresh workspace (its current directory) with relative paths into
/// `workspace/run`; returns the workspace and the run folder.
fn trained_relative_run() -> (tempfile::TempDir, PathBuf) {
    let workspace_dir = relative_workspace();
    let workspace = workspace_dir.path();
    let out = command(&[
        "train",
        "--config",
        "config.toml",
        "--model",
        "model",
        "--out",
        "run",
    ])
    .current_dir(workspace)
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let run = workspace.join("run");
    (workspace_dir, run)
}

#[test]
fn a_run_trained_with_relative_paths_evaluates_predicts_and_resumes_from_another_folder() {
    let (workspace, run) = trained_relative_run();
    let elsewhere = tempfile::tempdir().unwrap();
    let data = workspace.path().join("data.csv");
    let in_elsewhere = |args: &[&str]| {
        let out = command(args)
            .current_dir(elsewhere.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    };
    let adapter = run.join("adapter");
    in_elsewhere(&[
        "eval",
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let predictions = elsewhere.path().join("predictions.csv");
    in_elsewhere(&[
        "predict",
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        predictions.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(&predictions)
            .unwrap()
            .lines()
            .count(),
        41
    );
    let out = in_elsewhere(&["train", "--resume", run.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("resuming after step"),
        "{}",
        stderr(&out)
    );

    // What the run recorded names its files absolutely.
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let config: toml::Table = toml::from_str(&config).unwrap();
    for (section, key) in [("model", "dir"), ("data", "train")] {
        let path = config[section][key].as_str().unwrap();
        assert!(Path::new(path).is_absolute(), "{section}.{key} = {path}");
    }
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("graft_task.json")).unwrap())
            .unwrap();
    let model = task["model_dir"].as_str().unwrap();
    assert!(Path::new(model).is_absolute(), "model_dir = {model}");
}

/// A shared library whose initialiser writes `marker`: loading it at all is visible.
fn marker_library(dir: &Path, marker: &Path) -> PathBuf {
    let source = format!(
        "#include <stdio.h>\n\
         __attribute__((constructor)) static void loaded(void) {{\n\
           FILE *f = fopen(\"{}\", \"w\"); if (f) fclose(f);\n\
         }}\n\
         const char *graft_plugin_abi(void) {{ return \"not graft\"; }}\n",
        marker.display()
    );
    common::c_library(dir, "graft_plugin_marker", &source)
}

#[test]
fn resuming_a_run_never_loads_the_plugin_directories_its_config_names() {
    let (_workspace, run) = trained_relative_run();

    let planted = tempfile::tempdir().unwrap();
    let marker = planted.path().join("loaded");
    marker_library(planted.path(), &marker);
    // The run folder is data someone could have edited: its config now names the library.
    let config_path = run.join("config.toml");
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["plugins"]["dirs"] = toml::Value::Array(vec![toml::Value::String(
        planted.path().display().to_string(),
    )]);
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

    let out = graft(&["train", "--resume", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !marker.exists(),
        "resuming loaded a library from the run config's plugin directories"
    );

    // The marker works: a directory named on the command line is searched, and loads it.
    let out = graft(&["plugins", "--plugin-dir", planted.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        marker.exists(),
        "the marker library did not mark its loading"
    );
}

#[test]
fn an_unknown_method_is_the_first_error_and_lists_the_installed_ones() {
    let missing = "/nonexistent/graft-test";
    for args in [
        vec![
            "train", "--method", "lorra", "--data", missing, "--model", missing,
        ],
        vec!["train", "--method", "lorra", "--data", missing],
    ] {
        let out = graft(&args);
        let message = stderr(&out);
        assert!(!out.status.success());
        assert!(
            message.contains("`lorra`") && message.contains("lora, p-tuning"),
            "{message}"
        );
        assert!(!message.contains("nonexistent"), "{message}");
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lm.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = \"{missing}\"\n[data]\ntrain = \"{missing}\"\n\
             [train]\nmax_steps = 1\nbatch_size = 1\n[method]\nname = \"lorra\"\n"
        ),
    )
    .unwrap();
    let out = graft(&[
        "train-lm",
        "--config",
        config.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    let message = stderr(&out);
    assert!(!out.status.success());
    assert!(message.contains("`lorra`"), "{message}");
    assert!(!message.contains("nonexistent"), "{message}");
}

#[test]
fn a_folder_peft_wrote_evaluates_with_model_and_unimplemented_fields_are_refused_by_name() {
    let fixture = testkit::fixture_dir("lora_minilm");
    let minilm = testkit::minilm_dir().unwrap();
    let demo = testkit::workspace_root().join("data/demo.csv");
    let eval = |adapter: &Path, model: Option<&Path>| {
        let mut args = vec![
            "eval".to_string(),
            "--adapter".into(),
            adapter.display().to_string(),
            "--data".into(),
            demo.display().to_string(),
        ];
        if let Some(model) = model {
            args.extend(["--model".into(), model.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        graft(&args)
    };
    let out = eval(&fixture, Some(&minilm));
    assert!(out.status.success(), "{}", stderr(&out));
    let evaluation: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("eval prints its evaluation as JSON");
    assert_eq!(evaluation["count"], 40);

    // Without --model, the error says what to give.
    let message = stderr(&eval(&fixture, None));
    assert!(
        message.contains("--model") && message.contains("sentence-transformers/all-MiniLM-L6-v2"),
        "{message}"
    );

    // PEFT fields graft does not implement, set away from PEFT's defaults: refused by name.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (field, value) in [
        ("alpha_pattern", serde_json::json!({ "query": 32 })),
        ("rank_pattern", serde_json::json!({ "value": 4 })),
        ("layers_to_transform", serde_json::json!([0, 1])),
        ("layers_pattern", serde_json::json!("layer")),
        ("init_lora_weights", serde_json::json!("pissa")),
        (
            "modules_to_save",
            serde_json::json!(["classifier", "pooler"]),
        ),
        ("a_field_from_a_later_peft", serde_json::json!(3)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture.join("adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut edited = config.clone();
        edited[field] = value;
        std::fs::write(
            dir.path().join("adapter_config.json"),
            serde_json::to_string(&edited).unwrap(),
        )
        .unwrap();
        let out = eval(dir.path(), Some(&minilm));
        let message = stderr(&out);
        assert!(!out.status.success(), "{field} was accepted");
        assert!(message.contains(field), "{field}: {message}");
    }
}

#[test]
fn the_first_training_line_says_when_openblas_is_missing_and_how_to_get_it() {
    let empty_cache = tempfile::tempdir().unwrap();
    let out = command(&["train", "--method", "lorra"])
        .env("GRAFT_BLAS", "libgraft-no-such-blas.so.0")
        .output()
        .unwrap();
    let message = stderr(&out);
    let first = message.lines().next().unwrap_or_default();
    assert!(
        first.contains("OpenBLAS was not found")
            && first.contains("libgraft-no-such-blas.so.0")
            && first.contains("graft fetch-blas")
            && first.contains("apt-get install libopenblas0-pthread"),
        "{message}"
    );
    // `off` leaves the system's library out: with no copy in graft's cache, nothing is found.
    let out = command(&["train", "--method", "lorra"])
        .env("GRAFT_BLAS", "off")
        .env("GRAFT_CACHE_DIR", empty_cache.path())
        .output()
        .unwrap();
    let first = stderr(&out).lines().next().unwrap_or_default().to_string();
    assert!(
        first.contains("OpenBLAS was not found")
            && first.contains(&empty_cache.path().display().to_string()),
        "{first}"
    );
    let out = command(&["train", "--method", "lorra"])
        .env("GRAFT_BLAS", "gemm")
        .output()
        .unwrap();
    let first = stderr(&out).lines().next().unwrap_or_default().to_string();
    assert!(first.contains("GRAFT_BLAS=gemm"), "{first}");
}

/// The README's commands need no system package for OpenBLAS: `graft fetch-blas` (which
/// `cargo xtask` runs after every build) puts graft's own copy in its cache, and the products
/// run on it, also with the system's left out (`GRAFT_BLAS=off`).
#[test]
fn graft_fetches_its_own_openblas_and_runs_on_it_without_the_system_library() {
    for blas in [None, Some("off")] {
        let mut fetch = std::process::Command::new(env!("CARGO_BIN_EXE_graft"));
        fetch.arg("fetch-blas").env_remove("GRAFT_BLAS");
        if let Some(value) = blas {
            fetch.env("GRAFT_BLAS", value);
        }
        let out = fetch.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(Path::new(&path).is_file(), "{path}");
        let message = stderr(&out);
        assert!(
            message.contains("large products run on OpenBLAS 0.3.34")
                && message.contains("graft's copy"),
            "GRAFT_BLAS={blas:?}: {message}"
        );
    }
}

/// A wheel whose hash is not the pinned one is refused before anything is unpacked.
#[test]
fn a_wheel_with_another_hash_is_refused() {
    let dest = tempfile::tempdir().unwrap();
    let wheel = graft_model::zoo::PipWheel {
        hashes: &["0000000000000000000000000000000000000000000000000000000000000000"],
        ..graft_model::ops::OPENBLAS_WHEEL
    };
    let error = wheel
        .fetch(&dest.path().join("openblas"))
        .unwrap_err()
        .to_string();
    assert!(error.to_lowercase().contains("hash"), "{error}");
    assert!(!wheel.is_in(&dest.path().join("openblas")));
}
