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
