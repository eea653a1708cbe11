//! The graft binary links libstd and graft-peft dynamically (one candle shared with plugins).
//! RUNPATH lets it start without LD_LIBRARY_PATH: `$ORIGIN` for libgraft_peft beside it, and
//! the toolchain's library directory for libstd.
use std::process::Command;

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    if let Some(libdir) = Command::new(rustc)
        .args(["--print", "target-libdir"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{}", libdir.trim());
    }
    println!("cargo:rerun-if-env-changed=RUSTC");
}
