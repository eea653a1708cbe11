//! `cargo xtask new-plugin`: a standalone plugin crate outside the workspace that compiles
//! against this checkout's own graft-peft library.
//!
//! Why not a path dependency on graft-peft: Rust symbol names carry a hash of how each crate was
//! built (workspace, lockfile, features, profile), so a graft-peft compiled by another cargo
//! project exports differently named symbols, and graft could not load the plugin. Instead the
//! generated `.cargo/config.toml` hands rustc the built library itself (`--extern`), with the
//! toolchain pinned to graft's: the plugin links exactly what the host runs.
use crate::{root, target_dir};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const LIB_TEMPLATE: &str = include_str!("../templates/lib.rs");
const TEST_TEMPLATE: &str = include_str!("../templates/test.rs");

/// The libraries a plugin compiles against: graft-peft's shared library, and for its tests the
/// rlibs of graft-trainer and graft-testkit.
struct Artifacts {
    peft: PathBuf,
    trainer: PathBuf,
    testkit: PathBuf,
}

/// The rlibs a plugin's tests link, by crate name.
const TEST_RLIBS: [&str; 2] = ["graft_trainer", "graft_testkit"];

/// The libraries in the existing build, without building: the shared library (one per
/// profile) and the newest rlib of each test crate. For callers that run inside a build of
/// their own (the test suite), where another cargo build would replace the libraries their
/// other tests are loading.
fn existing_artifacts() -> Result<Artifacts> {
    let deps = target_dir().join("debug").join("deps");
    let peft = deps.join(format!(
        "{}graft_peft{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    if !peft.is_file() {
        bail!("{} is missing: build graft first", peft.display());
    }
    let newest_rlib = |krate: &str| -> Result<PathBuf> {
        let prefix = format!("lib{krate}-");
        std::fs::read_dir(&deps)
            .with_context(|| format!("reading {}", deps.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".rlib"))
            })
            .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
            .with_context(|| format!("no {krate} rlib in {}: build graft first", deps.display()))
    };
    let [trainer, testkit] = TEST_RLIBS.map(newest_rlib);
    Ok(Artifacts {
        peft,
        trainer: trainer?,
        testkit: testkit?,
    })
}

/// The libraries that a workspace build produces, from cargo's own artifact messages (several
/// builds can leave several hashed rlibs behind).
fn artifacts() -> Result<Artifacts> {
    let output = Command::new(crate::cargo())
        .current_dir(root())
        .args(["build", "--workspace", "--message-format=json"])
        .output()
        .context("running cargo build")?;
    if !output.status.success() {
        bail!(
            "cargo build failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let (mut peft, mut trainer, mut testkit) = (None, None, None);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let files: Vec<PathBuf> = message["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str().map(PathBuf::from))
            .collect();
        let name = message["target"]["name"].as_str().unwrap_or_default();
        let find = |ext: &str| {
            files
                .iter()
                .find(|f| f.extension().is_some_and(|e| e == ext))
                .cloned()
        };
        match name {
            "graft_peft" => peft = find(std::env::consts::DLL_EXTENSION),
            "graft_trainer" => trainer = find("rlib"),
            "graft_testkit" => testkit = find("rlib"),
            _ => {}
        }
    }
    match (peft, trainer, testkit) {
        (Some(peft), Some(trainer), Some(testkit)) => Ok(Artifacts {
            peft,
            trainer,
            testkit,
        }),
        _ => {
            bail!("cargo did not report the graft-peft, graft-trainer and graft-testkit libraries")
        }
    }
}

fn rustc_libdir() -> Result<String> {
    let output = Command::new("rustc")
        .current_dir(root())
        .args(["--print", "target-libdir"])
        .output()
        .context("running rustc --print target-libdir")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// `.cargo/config.toml` of a plugin: build it against this checkout's libraries.
fn cargo_config(build: bool) -> Result<String> {
    let built = if build {
        artifacts()?
    } else {
        existing_artifacts()?
    };
    let deps = target_dir()
        .join("debug")
        .join("deps")
        .display()
        .to_string();
    let flags = [
        "-C".to_string(),
        "prefer-dynamic".into(),
        "--extern".into(),
        format!("graft_peft={}", built.peft.display()),
        "--extern".into(),
        format!("graft_trainer={}", built.trainer.display()),
        "--extern".into(),
        format!("graft_testkit={}", built.testkit.display()),
        "-L".into(),
        format!("dependency={deps}"),
        "-C".into(),
        format!("link-args=-Wl,-rpath,{deps}:{}", rustc_libdir()?),
    ];
    let quoted: Vec<String> = flags.iter().map(|f| format!("{f:?}")).collect();
    Ok(format!(
        "# Written by `cargo xtask new-plugin` from the graft checkout at {}.\n\
         # The plugin compiles against that build's own graft-peft (and its tests against\n\
         # graft-testkit and graft-trainer), which is what lets graft load it. After\n\
         # graft-peft changes, rebuild graft and run\n\
         # `cargo xtask new-plugin --refresh --path <this folder>` there.\n\
         [build]\nrustflags = [\n    {},\n]\n",
        root().display(),
        quoted.join(",\n    ")
    ))
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn new_plugin(name: &str, path: Option<PathBuf>, refresh: bool, build: bool) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
    {
        bail!(
            "plugin name `{name}`: use lowercase letters, digits and '-', starting with a letter"
        );
    }
    let dir = path.unwrap_or_else(|| PathBuf::from(format!("graft-plugin-{name}")));
    let config = cargo_config(build)?;
    if refresh {
        write(&dir.join(".cargo/config.toml"), &config)?;
        std::fs::copy(
            root().join("rust-toolchain.toml"),
            dir.join("rust-toolchain.toml"),
        )
        .context("copying rust-toolchain.toml")?;
        eprintln!("refreshed {}", dir.join(".cargo/config.toml").display());
        return Ok(());
    }
    if dir.join("Cargo.toml").exists() {
        bail!(
            "{} already holds a crate; choose another --path",
            dir.display()
        );
    }
    let krate = format!("graft_plugin_{}", name.replace('-', "_"));
    let title = name
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("");
    let fill = |template: &str| {
        template
            .replace("__NAME__", name)
            .replace("__TITLE__", &title)
            .replace(
                "__PEFT_TYPE__",
                &name.replace('-', "_").to_ascii_uppercase(),
            )
            .replace("__CRATE__", &krate)
    };
    write(
        &dir.join("Cargo.toml"),
        &format!(
            "[package]\nname = \"graft-plugin-{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\n# dylib: what graft loads; rlib: what the tests link.\n\
             crate-type = [\"dylib\", \"rlib\"]\n\
             # rustdoc does not get the rustflags that find graft-peft.\n\
             doctest = false\n\n\
             # graft-peft (and graft-testkit for tests) are not dependencies here: .cargo/config.toml\n\
             # hands rustc the host's own built libraries.\n[dependencies]\n\n\
             # A project of its own, not a member of any workspace above it.\n[workspace]\n"
        ),
    )?;
    std::fs::copy(
        root().join("rust-toolchain.toml"),
        dir.join("rust-toolchain.toml"),
    )
    .context("copying rust-toolchain.toml")?;
    write(&dir.join(".cargo/config.toml"), &config)?;
    write(&dir.join("src/lib.rs"), &fill(LIB_TEMPLATE))?;
    write(&dir.join(format!("tests/{krate}.rs")), &fill(TEST_TEMPLATE))?;
    write(&dir.join(".gitignore"), "/target\n")?;
    let library = target_dir().join("debug");
    eprintln!(
        "created {dir}: a working bias-tuning method named `{name}`.\n\
         build:  cd {dir} && cargo build        (the plugin: target/debug/lib{krate}.so)\n\
         test:   cd {dir} && cargo test\n\
         use:    {graft} train --method {name} --plugin-dir {dir}/target/debug",
        dir = dir.display(),
        graft = library.join("graft").display(),
    );
    Ok(())
}
