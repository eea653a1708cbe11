//! Records what a plugin's ABI depends on: the compiler that builds this crate and the enabled
//! candle features. A plugin must come from the identical rustc with the same features.
use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
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
    println!("cargo:rustc-env=GRAFT_RUSTC_VERSION={version}");
    println!("cargo:rustc-env=GRAFT_FEATURES={features}");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
