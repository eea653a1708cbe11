//! Plugins loaded at run time: LoRA trains through its dynamic library; a library with its
//! own static candle, or that is no plugin at all, is refused with a clear error.
use graft_peft::candle::DType;
use graft_peft::loader::{load_plugin, Registry};
use graft_peft::PluginError;
use graft_testkit as testkit;
use std::path::{Path, PathBuf};

mod common;

/// `target/<profile>`, from this test binary's path (`target/<profile>/deps/plugins-...`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn library_file(stem: &str) -> String {
    format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// A workspace library, as `cargo build --workspace` leaves it: built every time (a no-op when
/// up to date), so a stale file from an older build is never what a test loads. Always the whole
/// workspace: a `-p` selection can resolve features apart and rebuild graft-peft under the other
/// plugins. That build must find graft-peft fresh: a rebuild would replace the libgraft_peft this
/// test binary runs on (graft-model's Cargo.toml keeps `cargo build` and `cargo test` agreeing).
fn workspace_library(stem: &str) -> PathBuf {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--workspace",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(testkit::workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo build --workspace failed");
    let rebuilt_peft = String::from_utf8_lossy(&output.stdout).lines().any(|line| {
        let message: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        message["reason"] == "compiler-artifact"
            && message["target"]["name"] == "graft_peft"
            && message["fresh"] == false
    });
    assert!(
        !rebuilt_peft,
        "`cargo build --workspace` rebuilt graft-peft, which this test binary was built against: \
         `cargo build` and this `cargo test` resolve features differently (a dev-dependency \
         turns on a feature the build lacks; see graft-model's Cargo.toml), or this test runs \
         from a narrower selection than `cargo test --workspace`"
    );
    let file = library_file(stem);
    [
        profile_dir().join(&file),
        profile_dir().join("deps").join(&file),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| panic!("cargo build --workspace left no {file}"))
}

#[test]
fn lora_loads_dynamically_and_trains_through_the_library() {
    let path = workspace_library("graft_plugin_lora");
    let plugin = load_plugin(&path).unwrap();
    assert_eq!(plugin.method.name(), "lora");
    assert_eq!(plugin.abi, graft_peft::abi::ABI);
    let settings = serde_json::json!({ "r": 4, "lora_alpha": 8 });
    let mut classifier =
        testkit::classifier(plugin.method.as_ref(), &settings, DType::F32, 48, 2).unwrap();
    let (texts, labels) = testkit::real_batch(4).unwrap();
    let (losses, silent) = testkit::train_steps(&mut classifier, &texts, &labels, 4, 1e-2).unwrap();
    assert!(silent.is_empty(), "tensors without gradient: {silent:?}");
    assert!(losses[3] < losses[0], "loss did not fall: {losses:?}");
}

#[test]
fn discovery_finds_lora_in_a_directory() {
    let path = workspace_library("graft_plugin_lora");
    let registry = Registry::discover(&[path.parent().unwrap().to_path_buf()]);
    let lora = registry.get("lora").unwrap();
    assert_eq!(lora.method.peft_type(), "LORA");
    let unknown = registry.get("no-such-method").unwrap_err().to_string();
    assert!(
        unknown.contains("no-such-method") && unknown.contains("lora"),
        "{unknown}"
    );
}

#[test]
fn a_plugin_with_its_own_static_candle_is_refused() {
    let path = workspace_library("static_candle_fixture");
    let err = load_plugin(&path).unwrap_err();
    // Its ABI string is graft's own: only the probe can catch it.
    assert!(matches!(err, PluginError::ProbeFailed { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("static_candle_fixture"), "{message}");
    assert!(
        message.contains("does not share graft's candle"),
        "{message}"
    );
}

#[test]
fn missing_files_non_libraries_and_libraries_without_the_entry_points_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join(library_file("graft_plugin_missing"));
    assert!(matches!(
        load_plugin(&missing),
        Err(PluginError::NotFound { .. })
    ));

    let garbage = dir.path().join(library_file("graft_plugin_garbage"));
    std::fs::write(&garbage, b"not a shared object").unwrap();
    let err = load_plugin(&garbage).unwrap_err();
    assert!(matches!(err, PluginError::NotALibrary { .. }), "{err:?}");
    assert!(err.to_string().contains("graft_plugin_garbage"));

    // graft-peft itself is a library but exports no plugin entry point.
    let peft = workspace_library("graft_peft");
    let err = load_plugin(&peft).unwrap_err();
    assert!(
        err.to_string().contains("graft_plugin_abi") && err.to_string().contains("graft_peft"),
        "{err}"
    );
}

/// A C library whose `graft_plugin_abi` returns `abi`: a plugin as far as the ABI check can see.
fn fake_plugin(dir: &Path, stem: &str, abi: &str) -> PathBuf {
    let source = format!("const char *graft_plugin_abi(void) {{ return {abi:?}; }}\n");
    common::c_library(dir, stem, &source)
}

#[test]
fn a_plugin_built_for_another_abi_is_refused_naming_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let library = fake_plugin(
        dir.path(),
        "graft_plugin_fake",
        "graft-peft 0.0.1; rustc 1.0.0 (old); features cuda",
    );
    let err = load_plugin(&library).unwrap_err();
    assert!(matches!(err, PluginError::AbiMismatch { .. }), "{err:?}");
    let message = err.to_string();
    for needle in [
        "graft_plugin_fake",
        "rustc 1.0.0",
        "features cuda",
        "graft-peft 0.0.1",
    ] {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
}

/// A plugin built from the same graft-peft version, compiler and features but an older source
/// (a pull, then a rebuild of graft alone) differs only in the source hash, and is refused.
#[test]
fn a_plugin_built_against_other_graft_source_is_refused_as_stale() {
    let abi = graft_peft::abi::ABI;
    let (head, tail) = abi.split_once("; source ").unwrap();
    let (hash, rest) = tail.split_once("; ").unwrap();
    assert_eq!(hash.len(), 16, "{abi}");
    let stale = format!("{head}; source {}; {rest}", "0".repeat(16));
    let dir = tempfile::tempdir().unwrap();
    let library = fake_plugin(dir.path(), "graft_plugin_stale", &stale);
    let err = load_plugin(&library).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, PluginError::AbiMismatch { differs, .. } if differs == "graft-peft/graft-model source"),
        "{message}"
    );
    assert!(message.contains("rebuild this plugin"), "{message}");

    let old_candle = format!("{}; candle-core 0.1.0", abi.rsplit_once("; ").unwrap().0);
    let library = fake_plugin(dir.path(), "graft_plugin_old_candle", &old_candle);
    let err = load_plugin(&library).unwrap_err();
    assert!(
        matches!(&err, PluginError::AbiMismatch { differs, .. } if differs == "candle version"),
        "{err}"
    );
}

#[test]
fn two_libraries_of_one_method_in_a_directory_are_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let lora = workspace_library("graft_plugin_lora");
    for name in ["graft_plugin_lora", "graft_plugin_lora_copy"] {
        std::fs::copy(&lora, dir.path().join(library_file(name))).unwrap();
    }
    let registry = Registry::discover(&[dir.path().to_path_buf()]);
    let err = registry.get("lora").unwrap_err();
    assert!(matches!(err, PluginError::DuplicateName { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("graft_plugin_lora_copy") && message.contains("two plugins claim"),
        "{message}"
    );
}

#[test]
fn every_shipped_config_loads_its_plugin_dynamically_and_attaches_to_minilm() {
    let configs = testkit::workspace_root().join("configs");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue; // configs/lm: decoder runs, checked below
        }
        let config = graft_trainer::config::TrainConfig::from_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = config.method_name().unwrap().to_string();
        let library = workspace_library(&format!("graft_plugin_{}", name.replace('-', "_")));
        let plugin = load_plugin(&library).unwrap();
        assert_eq!(plugin.method.name(), name, "{}", library.display());
        testkit::classifier(
            plugin.method.as_ref(),
            &config.method_settings(),
            DType::F32,
            32,
            1,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        names.push(name);
    }
    let mut plugins: Vec<String> = std::fs::read_dir(testkit::workspace_root().join("plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "testing")
        .collect();
    plugins.sort();
    names.sort();
    assert_eq!(names, plugins, "one config per in-tree method");

    let listing = std::process::Command::new(env!("CARGO_BIN_EXE_graft"))
        .args(["plugins", "--plugin-dir"])
        .arg(profile_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listing.stdout);
    for name in &names {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name} "))),
            "`graft plugins` does not list {name}:\n{text}"
        );
    }
}

mod misbehaving {
    //! Plugins that panic or break a hook's contract: the host turns both into errors.
    use graft_peft::candle::{Result as CandleResult, Tensor, Var};
    use graft_peft::graft_model::{Hooks, LinearSite};
    use graft_peft::{Adapter, AttachContext, Method, Result};
    use graft_testkit as testkit;
    use graft_trainer::task::Classifier;
    use std::collections::HashMap;

    #[derive(Clone, Copy)]
    enum Fault {
        PanicInCreate,
        PanicInHook,
        WrongShape,
        WrongPromptWidth,
    }

    struct Broken(Fault);

    impl Method for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        fn peft_type(&self) -> &'static str {
            "BROKEN"
        }
        fn version(&self) -> &'static str {
            "0"
        }
        fn create(&self, _: &serde_json::Value, _: &AttachContext) -> Result<Box<dyn Adapter>> {
            if let Fault::PanicInCreate = self.0 {
                panic!("create exploded");
            }
            Ok(Box::new(BrokenAdapter(self.0)))
        }
        fn load(
            &self,
            _: &serde_json::Value,
            _: &HashMap<String, Tensor>,
            _: &AttachContext,
        ) -> Result<Box<dyn Adapter>> {
            Ok(Box::new(BrokenAdapter(self.0)))
        }
    }

    struct BrokenAdapter(Fault);

    impl Hooks for BrokenAdapter {
        fn linear(&self, _: &LinearSite<'_>, _: &Tensor, base: Tensor) -> CandleResult<Tensor> {
            match self.0 {
                Fault::PanicInHook => panic!("linear exploded"),
                Fault::WrongShape => base.narrow(base.rank() - 1, 0, 1),
                _ => Ok(base),
            }
        }
        fn prompt(&self, batch: usize) -> CandleResult<Option<Tensor>> {
            match self.0 {
                Fault::WrongPromptWidth => Tensor::zeros(
                    (batch, 2, 7),
                    graft_peft::candle::DType::F32,
                    &graft_peft::candle::Device::Cpu,
                )
                .map(Some),
                _ => Ok(None),
            }
        }
    }

    impl Adapter for BrokenAdapter {
        fn trainable(&self) -> Vec<(String, Var)> {
            Vec::new()
        }
        fn config_json(&self) -> serde_json::Value {
            serde_json::json!({})
        }
    }

    fn error_of(fault: Fault) -> String {
        let registry = testkit::registry_of(Box::new(Broken(fault))).unwrap();
        let method = registry.get("broken").unwrap().method.as_ref();
        let spec = testkit::spec("broken", 16).unwrap();
        let result = Classifier::create(
            spec,
            method,
            &serde_json::json!({}),
            &graft_peft::candle::Device::Cpu,
            graft_peft::candle::DType::F32,
            1,
            10,
        )
        .and_then(|c| c.logits(&["a text".to_string()]));
        match result {
            Ok(_) => panic!("the broken plugin was not caught"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_panic_inside_a_plugin_call_is_an_error_naming_the_call() {
        let message = error_of(Fault::PanicInCreate);
        assert!(
            message.contains("panicked in `create`") && message.contains("create exploded"),
            "{message}"
        );
        let message = error_of(Fault::PanicInHook);
        assert!(
            message.contains("panicked in `linear`") && message.contains("linear exploded"),
            "{message}"
        );
        assert!(message.contains("statically linked broken"), "{message}");
    }

    #[test]
    fn a_hook_returning_the_wrong_shape_is_refused_by_the_host() {
        let message = error_of(Fault::WrongShape);
        assert!(
            message.contains("`linear(bert.encoder.layer.0.attention.self.query)` hook returned")
                && message.contains("expected F32 [1, 4, 384]"),
            "{message}"
        );
        let message = error_of(Fault::WrongPromptWidth);
        assert!(
            message.contains("`prompt` hook returned F32 [1, 2, 7], expected F32 [1, 2, 384]"),
            "{message}"
        );
    }
}

/// Runs `cmd`, asserting success; returns its stdout and stderr.
fn run_ok(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// `cargo xtask new-plugin ARGS`, from the workspace, against this test run's own libraries
/// (a cargo build here would replace the libraries other tests are loading).
fn xtask_new_plugin(args: &[&str], path: &Path) {
    run_ok(
        std::process::Command::new(profile_dir().join("xtask"))
            .arg("new-plugin")
            .args(args)
            .arg("--no-build")
            .arg("--path")
            .arg(path)
            .current_dir(testkit::workspace_root()),
        "cargo xtask new-plugin",
    );
}

/// Builds and tests an out-of-tree plugin crate as the separate cargo project it is; returns
/// the folder of its library and the test output.
fn build_out_of_tree(crate_dir: &Path, tests: usize) -> PathBuf {
    let cargo = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(args)
            .current_dir(crate_dir)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS");
        cmd
    };
    run_ok(&mut cargo(&["build"]), "cargo build of the plugin");
    let output = run_ok(&mut cargo(&["test"]), "cargo test of the plugin");
    let passed = format!("test result: ok. {tests} passed");
    assert!(output.contains(&passed), "{output}");
    assert!(crate_dir.join("Cargo.lock").is_file(), "its own lockfile");
    crate_dir.join("target/debug")
}

#[test]
fn a_scaffolded_plugin_builds_as_its_own_project_passes_its_tests_and_trains_in_graft() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("graft-plugin-scaffolded");
    xtask_new_plugin(&["scaffolded"], &crate_dir);
    let plugin_dir = build_out_of_tree(&crate_dir, 3);
    let graft = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_graft"));
        cmd.args(args)
            .arg("--plugin-dir")
            .arg(&plugin_dir)
            .current_dir(testkit::workspace_root());
        cmd
    };
    let listing = run_ok(&mut graft(&["plugins"]), "graft plugins");
    assert!(
        listing.contains("scaffolded") && listing.contains("graft_plugin_scaffolded"),
        "{listing}"
    );
    let run = dir.path().join("run");
    let model = testkit::minilm_dir().unwrap();
    // Found through the training config's [plugins] dirs (no --plugin-dir).
    let config = dir.path().join("train.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins]\ndirs = [{:?}]\n[method]\nname = \"scaffolded\"\n",
            plugin_dir.display().to_string()
        ),
    )
    .unwrap();
    run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_graft"))
            .args([
                "train",
                "--max-steps",
                "3",
                "--data",
                "data/demo.csv",
                "--config",
            ])
            .arg(&config)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&run)
            .current_dir(testkit::workspace_root()),
        "graft train with the scaffolded plugin",
    );
    let adapter = run.join("adapter").display().to_string();
    run_ok(
        &mut graft(&["eval", "--data", "data/demo.csv", "--adapter", &adapter]),
        "graft eval of the saved adapter (reload)",
    );
}

#[test]
fn the_out_of_tree_dora_example_passes_the_method_test_kit() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("dora");
    let example = testkit::workspace_root().join("examples/dora");
    for file in ["Cargo.toml", "src/lib.rs", "tests/dora.rs"] {
        let target = crate_dir.join(file);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(example.join(file), target).unwrap();
    }
    xtask_new_plugin(&["dora", "--refresh"], &crate_dir);
    build_out_of_tree(&crate_dir, 3);
}

#[test]
fn every_shipped_decoder_config_parses_and_names_a_shipped_plugin() {
    let configs = testkit::workspace_root().join("configs/lm");
    let mut count = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        let config = graft_trainer::lm_train::LmConfig::from_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = config.method_name().unwrap().to_string();
        let library = workspace_library(&format!("graft_plugin_{}", name.replace('-', "_")));
        assert_eq!(load_plugin(&library).unwrap().method.name(), name);
        config.template().unwrap();
        count += 1;
    }
    assert!(count >= 2, "configs/lm holds the decoder demos");
}
