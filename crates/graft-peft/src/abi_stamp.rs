//! What the ABI string is made of, computed at build time. One file for graft-peft's build
//! script (`#[path]`-included there), the static-candle test fixture's build script, and this
//! crate's test that the embedded stamp matches the source on disk.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Source folders whose code crosses the plugin boundary: graft-peft's own and graft-model's,
/// whose types and inlined code a plugin compiles against. `crate_dir` is graft-peft's folder.
pub fn source_dirs(crate_dir: &Path) -> Vec<PathBuf> {
    [crate_dir.join("src"), crate_dir.join("../graft-model/src")]
        .into_iter()
        .filter(|dir| dir.is_dir())
        .collect()
}

/// FNV-1a over every `.rs` file under `dirs` (path relative to its folder, then contents), in
/// sorted order: stable across machines, checkouts and compilers, and changed by any edit.
pub fn source_hash(dirs: &[PathBuf]) -> io::Result<String> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (index, dir) in dirs.iter().enumerate() {
        let mut files = Vec::new();
        rust_files(dir, &mut files)?;
        files.sort();
        for file in files {
            let relative = file.strip_prefix(dir).unwrap_or(&file);
            feed(format!("{index}/{}\0", relative.display()).as_bytes());
            feed(&fs::read(&file)?);
            feed(b"\0");
        }
    }
    Ok(format!("{hash:016x}"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// candle-core's version as the nearest `Cargo.lock` above `start` resolved it (the lock of
/// the workspace being built: the target folder usually sits in it), with its git revision
/// when it comes from git.
pub fn candle_version(start: &Path) -> Option<(String, PathBuf)> {
    let lock = start
        .ancestors()
        .map(|dir| dir.join("Cargo.lock"))
        .find(|path| path.is_file())?;
    let text = fs::read_to_string(&lock).ok()?;
    let version = text.split("[[package]]").find_map(|package| {
        let field = |name: &str| {
            package.lines().find_map(|line| {
                let value = line.trim().strip_prefix(name)?.trim_start();
                Some(
                    value
                        .strip_prefix('=')?
                        .trim()
                        .trim_matches('"')
                        .to_string(),
                )
            })
        };
        (field("name")? == "candle-core").then(|| {
            let version = field("version").unwrap_or_default();
            match field("source").and_then(|s| s.split_once('#').map(|(_, r)| r.to_string())) {
                Some(revision) => format!("{version} git {revision}"),
                None => version,
            }
        })
    })?;
    Some((version, lock))
}

/// Prints the build script's `cargo:` lines: the environment `abi.rs` reads to form the ABI
/// string, and when to run again. `crate_dir` is graft-peft's folder.
pub fn emit(crate_dir: &Path) {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let compiler = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "rustc unknown".into());
    let features = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        "cuda"
    } else {
        "cpu"
    };
    let dirs = source_dirs(crate_dir);
    let source = source_hash(&dirs).unwrap_or_else(|e| format!("unreadable ({e})"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let candle = candle_version(&out_dir).or_else(|| candle_version(crate_dir));
    let candle_text = candle
        .as_ref()
        .map_or_else(|| "unknown".to_string(), |(v, _)| v.clone());
    println!("cargo:rustc-env=GRAFT_RUSTC_VERSION={compiler}");
    println!("cargo:rustc-env=GRAFT_FEATURES={features}");
    println!("cargo:rustc-env=GRAFT_SOURCE_HASH={source}");
    println!("cargo:rustc-env=GRAFT_CANDLE_VERSION={candle_text}");
    println!("cargo:rerun-if-env-changed=RUSTC");
    for dir in &dirs {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    if let Some((_, lock)) = candle {
        println!("cargo:rerun-if-changed={}", lock.display());
    }
}
