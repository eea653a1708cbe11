//! The environment of the CUDA build (`--features cuda`): where its toolkit is, which compute
//! capability its kernels are compiled for, and where the binaries of a GPU run find their
//! libraries.
use crate::root;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The command that installs the pinned toolkit CI compiles with (xtask/cuda-toolkit.txt).
pub(crate) const INSTALL: &str =
    "python3 -m pip install --no-deps --target target/cuda-toolkit -r xtask/cuda-toolkit.txt";

/// Kernels are compiled for this compute capability when CUDA_COMPUTE_CAP is unset and no GPU
/// answers nvidia-smi, as in CI. candle embeds its kernels as PTX, which the driver compiles for
/// the GPU it finds: PTX for sm_80 runs on every GPU from A100 on (L4, L40S, H100, H200), where
/// 90 (which candle's build turns into sm_90a, arch-specific) runs on H100 and H200 only.
const DEFAULT_COMPUTE_CAP: &str = "80";

/// Where the toolkit is: CUDA_HOME, else PyPI's wheels under target/cuda-toolkit (prepared on
/// first use), else an nvcc on PATH (a system install, which the build scripts find themselves).
pub(crate) enum Toolkit {
    Home(PathBuf),
    Wheels(PathBuf),
    System,
}

pub(crate) fn toolkit() -> Result<Toolkit> {
    if let Some(home) = std::env::var_os("CUDA_HOME").map(PathBuf::from) {
        if home.join("bin/nvcc").is_file() {
            return Ok(Toolkit::Home(home));
        }
    }
    let wheels = root().join("target/cuda-toolkit/nvidia/cu13");
    if wheels.join("bin/nvcc").is_file() {
        prepare_wheels(&wheels)?;
        return Ok(Toolkit::Wheels(wheels));
    }
    if Command::new("nvcc").arg("--version").output().is_ok() {
        return Ok(Toolkit::System);
    }
    bail!(
        "--features cuda needs the CUDA toolkit's nvcc: none in $CUDA_HOME/bin, \
         target/cuda-toolkit or on PATH. Install the pinned toolkit CI uses (a 680 MB download) \
         from the repository root:\n  {INSTALL}"
    )
}

/// Sets what the build scripts read: nvcc on PATH and CUDA_HOME (cudarc's `nvcc --version` and
/// link search, candle-kernels' nvcc), and the compute capability, which candle-kernels otherwise
/// asks nvidia-smi for.
pub(crate) fn build_env(command: &mut Command, toolkit: &Toolkit) {
    if let Toolkit::Home(home) | Toolkit::Wheels(home) = toolkit {
        command
            .env("CUDA_HOME", home)
            .env("PATH", prepend_path(&home.join("bin"), "PATH"));
    }
    let gpu = Command::new("nvidia-smi")
        .output()
        .is_ok_and(|o| o.status.success());
    if std::env::var_os("CUDA_COMPUTE_CAP").is_none() && !gpu {
        eprintln!(
            "CUDA_COMPUTE_CAP is unset and no GPU answers nvidia-smi: \
             the kernels target compute capability {DEFAULT_COMPUTE_CAP}"
        );
        command.env("CUDA_COMPUTE_CAP", DEFAULT_COMPUTE_CAP);
    }
}

/// The wheels' libraries for a run (the driver's libcuda comes from the system, never the
/// stub). `cargo xtask` runs under `cargo run`, which puts the CPU build's folders on
/// LD_LIBRARY_PATH, searched before the binary's own folder: they are dropped, or the CUDA graft
/// would load the CPU build's graft-peft.
pub(crate) fn run_env(command: &mut Command, toolkit: &Toolkit, cpu_build: &Path) {
    let mut paths = Vec::new();
    if let Toolkit::Wheels(home) = toolkit {
        paths.push(home.join("lib"));
    }
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&old).filter(|p| !p.starts_with(cpu_build)));
    }
    if let Ok(joined) = std::env::join_paths(paths) {
        command.env("LD_LIBRARY_PATH", joined);
    }
}

fn prepend_path(dir: &Path, var: &str) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(old) = std::env::var_os(var) {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| dir.as_os_str().to_owned())
}

/// The wheels ship versioned libraries only (libcublas.so.13) and no libcuda, which is the
/// driver's: the linker needs `libX.so` names, and a stub libcuda.so with the driver API's
/// symbols, as a toolkit install's lib/stubs has. At run time the driver's libcuda.so.1 is used.
fn prepare_wheels(home: &Path) -> Result<()> {
    let lib = home.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some((stem, _version)) = name.split_once(".so.") {
            let link = lib.join(format!("{stem}.so"));
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(&name, &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
        }
    }
    let stubs = lib.join("stubs");
    let stub = stubs.join("libcuda.so");
    std::fs::create_dir_all(&stubs)?;
    let include = home.join("include");
    let header = include.join("cuda.h");
    // Names as written and after the preprocessor, which maps some to versioned symbols
    // (cuMemAlloc to cuMemAlloc_v2).
    let expanded = Command::new("cc")
        .args(["-E", "-P", "-I"])
        .arg(&include)
        .arg(&header)
        .output()
        .context("running cc -E on cuda.h (apt-get install gcc)")?;
    if !expanded.status.success() {
        bail!("cc -E {} failed", header.display());
    }
    let text = std::fs::read_to_string(&header)? + &String::from_utf8_lossy(&expanded.stdout);
    let mut names = driver_functions(&text);
    // cudaProfiler.h's, which cudarc binds and no wheel here ships.
    names.extend(["cuProfilerInitialize", "cuProfilerStart", "cuProfilerStop"]);
    let source: String = names
        .iter()
        .map(|name| format!("void {name}(void) {{}}\n"))
        .collect();
    let c = stubs.join("libcuda-stub.c");
    if stub.is_file() && std::fs::read_to_string(&c).is_ok_and(|old| old == source) {
        return Ok(());
    }
    std::fs::write(&c, source)?;
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&stub)
        .arg(&c)
        .status()
        .context("running cc")?;
    if !status.success() {
        bail!("building the libcuda stub {} failed", stub.display());
    }
    Ok(())
}

/// Driver API functions named in a header: identifiers `cuXxx` followed by `(`.
fn driver_functions(text: &str) -> BTreeSet<&str> {
    let mut names = BTreeSet::new();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let from = &rest[start..];
        let end = from.find(|c: char| !is_ident(c)).unwrap_or(from.len());
        let (name, after) = from.split_at(end);
        let called = after.trim_start().starts_with('(');
        if called
            && name.starts_with("cu")
            && name[2..].starts_with(|c: char| c.is_ascii_uppercase())
        {
            names.insert(name);
        }
        rest = after;
    }
    names
}

#[cfg(test)]
mod tests {
    use super::driver_functions;

    #[test]
    fn driver_functions_are_the_called_cu_names() {
        let header = "#define cuMemAlloc cuMemAlloc_v2\n\
                      CUresult CUDAAPI cuInit(unsigned int Flags);\n\
                      CUresult cuMemAlloc_v2 (CUdeviceptr *dptr, size_t bytesize);\n\
                      typedef void (CUDA_CB *CUhostFn)(void *userData);\n\
                      int cudaMalloc(void **p); int x = cuda(1);";
        let names: Vec<&str> = driver_functions(header).into_iter().collect();
        assert_eq!(names, ["cuInit", "cuMemAlloc_v2"]);
    }
}
