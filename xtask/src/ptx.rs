//! `cargo xtask check-ptx`: what a CUDA build asks of the machine it runs on. candle embeds its
//! kernels as PTX text, which the driver compiles when a kernel is first used, and a driver
//! compiles only the PTX ISA versions it knows: PTX from CUDA 13.4's nvcc (`.version 9.4`) fails
//! to load on driver 580 (CUDA 13.0). The check reads the `.version` and `.target` of every PTX
//! module embedded in the build's binaries and shared libraries, and the CUDA libraries they
//! link (NEEDED), and fails on a newer ISA or a library of another CUDA major version.
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest PTX ISA the build may embed: CUDA 13.0's, which driver 580 and newer load.
pub(crate) const MAX_PTX_ISA: (u32, u32) = (9, 0);
pub(crate) const MIN_DRIVER: &str = "580 (CUDA 13.0)";

/// The CUDA libraries the build may link: the driver's and CUDA 13's (what PyTorch's cu130
/// wheels ship), so a GPU machine's Python packages provide them.
const CUDA_SONAMES: [&str; 6] = [
    "libcuda.so.1",
    "libcudart.so.13",
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libcurand.so.10",
    "libnvrtc.so.13",
];

#[derive(Debug, PartialEq)]
pub(crate) struct PtxModule {
    pub version: (u32, u32),
    pub target: String,
}

/// Every PTX module in `bytes`: a line `.version X.Y` and the `.target` line after it.
pub(crate) fn ptx_modules(bytes: &[u8]) -> Vec<PtxModule> {
    const VERSION: &[u8] = b"\n.version ";
    const TARGET: &[u8] = b"\n.target ";
    let mut modules = Vec::new();
    let mut at = 0;
    while let Some(found) = find(&bytes[at..], VERSION) {
        let start = at + found + VERSION.len();
        at = start;
        let Some(version) = parse_version(line(&bytes[start..])) else {
            continue;
        };
        // The header is a few lines: `.version`, `.target`, `.address_size`.
        let window = &bytes[start..bytes.len().min(start + 256)];
        let target = find(window, TARGET)
            .map(|t| String::from_utf8_lossy(line(&window[t + TARGET.len()..])).into_owned())
            .unwrap_or_default();
        modules.push(PtxModule { version, target });
    }
    modules
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn line(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .position(|&b| b == b'\n' || b == b'\r' || b == 0)
        .unwrap_or(bytes.len());
    bytes[..end].trim_ascii()
}

fn parse_version(text: &[u8]) -> Option<(u32, u32)> {
    let (major, minor) = std::str::from_utf8(text).ok()?.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The ELF files (graft, libgraft_peft.so, the plugins) directly in `dir`.
fn elf_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let mut magic = [0u8; 4];
        let is_elf = path.is_file()
            && std::fs::File::open(&path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok()
            && magic == *b"\x7fELF";
        if is_elf {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The libraries an ELF file names as NEEDED (`readelf -d`).
fn needed(file: &Path) -> Result<Vec<String>> {
    let output = Command::new("readelf")
        .arg("-d")
        .arg(file)
        .output()
        .context("running readelf (binutils)")?;
    if !output.status.success() {
        bail!("readelf -d {} failed", file.display());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_string()))
        .collect())
}

/// Checks the ELF files in `dir`; returns a summary line per file. Fails where a PTX module is
/// newer than [`MAX_PTX_ISA`], a CUDA library outside [`CUDA_SONAMES`] is linked, or no file
/// holds PTX at all (not a CUDA build: the check would prove nothing).
pub(crate) fn check(dir: &Path) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    let mut total = 0;
    for file in elf_files(dir)? {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let modules = ptx_modules(&bytes);
        total += modules.len();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for m in &modules {
            *kinds
                .entry(format!("{}.{} {}", m.version.0, m.version.1, m.target))
                .or_default() += 1;
            if m.version > MAX_PTX_ISA {
                problems.push(format!(
                    "{name}: a PTX module of ISA {}.{} (target {}), newer than {}.{}, which driver {MIN_DRIVER} loads",
                    m.version.0, m.version.1, m.target, MAX_PTX_ISA.0, MAX_PTX_ISA.1
                ));
            }
        }
        let cuda: Vec<String> = needed(&file)?
            .into_iter()
            .filter(|l| l.starts_with("libcu") || l.starts_with("libnv"))
            .collect();
        for lib in &cuda {
            if !CUDA_SONAMES.contains(&lib.as_str()) {
                problems.push(format!(
                    "{name} links {lib}, not one of {}",
                    CUDA_SONAMES.join(", ")
                ));
            }
        }
        if !modules.is_empty() || !cuda.is_empty() {
            let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} x {k}")).collect();
            lines.push(format!(
                "{name}: PTX {}; links {}",
                if kinds.is_empty() {
                    "none".into()
                } else {
                    kinds.join(", ")
                },
                if cuda.is_empty() {
                    "no CUDA library".into()
                } else {
                    cuda.join(" ")
                }
            ));
        }
    }
    if total == 0 {
        problems.push(format!(
            "no PTX module in {}: not a CUDA build",
            dir.display()
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_modules_version_and_target() {
        let text = b"junk\0//\n// Generated by NVIDIA NVVM Compiler\n//\n\n.version 9.0\n.target sm_80\n.address_size 64\n\0more\n.version 9.4\r\n.target sm_90a\n\0\n.version x\n";
        assert_eq!(
            ptx_modules(text),
            [
                PtxModule {
                    version: (9, 0),
                    target: "sm_80".into()
                },
                PtxModule {
                    version: (9, 4),
                    target: "sm_90a".into()
                },
            ]
        );
        assert!(ptx_modules(b"no ptx here").is_empty());
    }
}
