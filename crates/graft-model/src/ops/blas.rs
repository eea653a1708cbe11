//! OpenBLAS, opened at run time for the large CPU products: on these machines its sgemm runs
//! about twice as fast as the gemm crate's kernels (`cargo run --release -p graft-benches
//! --example matmul_rate`). graft does not need a system package for it: `graft fetch-blas`
//! (which every `cargo xtask` command that runs graft calls) puts graft's own copy in its cache,
//! the OpenBLAS build NumPy and SciPy ship (PyPI's `scipy-openblas32`, pinned by version and
//! hash). Without any, graft computes with the gemm crate.
//!
//! OpenBLAS picks its kernels from the CPU model when it is loaded; on a virtual CPU it does
//! not recognise it falls back to a decades-old kernel, slower than the gemm crate. So
//! [`crate::runtime::init`] names the kernel family from the CPU's features before loading,
//! and a library whose chosen kernel is such a fallback is not used.
use crate::zoo::{cache_dir, PipWheel};
use libloading::Library;
use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

pub(crate) type Gemm<T> = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    T,
    *const T,
    c_int,
    *const T,
    c_int,
    T,
    *mut T,
    c_int,
);

/// `cblas_?gemv`: order, transpose, rows, columns, alpha, a, lda, x, incx, beta, y, incy.
pub(crate) type Gemv<T> = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    T,
    *const T,
    c_int,
    *const T,
    c_int,
    T,
    *mut T,
    c_int,
);

pub(crate) const ROW_MAJOR: c_int = 101;
pub(crate) const NO_TRANS: c_int = 111;
pub(crate) const TRANS: c_int = 112;

pub(crate) struct Blas {
    pub sgemm: Gemm<f32>,
    pub dgemm: Gemm<f64>,
    pub sgemv: Gemv<f32>,
    pub dgemv: Gemv<f64>,
    /// The kernel family the library runs, as it reports it.
    pub core: String,
    /// "OpenBLAS 0.3.34", from the library's build configuration.
    pub version: String,
    pub origin: Origin,
    _library: Library,
}

/// Where the library came from.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Origin {
    /// graft's own copy, in its cache ([`OPENBLAS_WHEEL`]).
    GraftCopy,
    /// The system's, under its usual names.
    System,
    /// The file `GRAFT_BLAS` names.
    Named,
}

impl Blas {
    /// "OpenBLAS 0.3.34 (graft's copy, Haswell kernels)", for reports and `eval.json`.
    pub fn describe(&self) -> String {
        let origin = match self.origin {
            Origin::GraftCopy => "graft's copy",
            Origin::System => "system",
            Origin::Named => "GRAFT_BLAS",
        };
        format!("{} ({origin}, {} kernels)", self.version, self.core)
    }
}

/// The wheel that carries graft's copy: OpenBLAS as NumPy and SciPy ship it (a DYNAMIC_ARCH
/// build that picks its kernels by CPU, its symbols prefixed `scipy_`, no other dependency).
pub const OPENBLAS_WHEEL: PipWheel = PipWheel {
    package: "scipy-openblas32==0.3.34.481.3",
    folder: "scipy_openblas32/lib/",
    files: &[COPY_FILE],
    hashes: &[
        // manylinux x86_64, manylinux aarch64, macOS arm64
        "0595f94cd58c1f8a0d90c975621f4587337a003916b1979e834ebdf2cb5d9504",
        "e085dddbc5b9aa130f83def515d31c440e69f387a90c7e63b154a5575b4466bc",
        "813bb8101da2f64555c4a5e71c3714539d92b0b4f1841ec12b80d50e56cde46c",
    ],
};

#[cfg(target_os = "macos")]
const COPY_FILE: &str = "libscipy_openblas.dylib";
#[cfg(not(target_os = "macos"))]
const COPY_FILE: &str = "libscipy_openblas.so";

/// The folder of graft's copy in its cache.
pub fn copy_dir() -> PathBuf {
    cache_dir().join("openblas")
}

/// The system library's usual names.
const SYSTEM_LIBRARIES: [&str; 3] = ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"];

/// Kernel families older than AVX2: slower than the gemm crate on any machine that has AVX2.
const FALLBACK_CORES: [&str; 8] = [
    "prescott",
    "core2",
    "penryn",
    "dunnington",
    "nehalem",
    "atom",
    "sandybridge",
    "unknown",
];

/// Why the large products run where they do: the outcome of looking for OpenBLAS.
pub(crate) enum Choice {
    /// OpenBLAS, running this kernel family.
    Blas(Blas),
    /// `GRAFT_BLAS=gemm`.
    Gemm,
    /// No library could be opened under these names.
    NotFound(Vec<String>),
    /// OpenBLAS picked a kernel family older than AVX2, slower than the gemm crate here.
    SlowKernels(String),
}

/// `GRAFT_BLAS`: unset, graft's copy, else the system's OpenBLAS, else the gemm crate; `off`
/// (or `0`) leaves the system's out, as on a machine without the package; `gemm` uses the gemm
/// crate; any other value names the library to open (a file name the loader searches for, or a
/// path).
pub(crate) const ENV: &str = "GRAFT_BLAS";

/// The outcome of looking for OpenBLAS, decided once per process.
pub(crate) fn choice() -> &'static Choice {
    static CHOICE: OnceLock<Choice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let copy = (
            copy_dir().join(COPY_FILE).display().to_string(),
            Origin::GraftCopy,
        );
        let system = SYSTEM_LIBRARIES
            .iter()
            .map(|n| (n.to_string(), Origin::System));
        let candidates: Vec<(String, Origin)> = match std::env::var(ENV) {
            Ok(v) if v == "gemm" => return Choice::Gemm,
            Ok(v) if v == "off" || v == "0" => vec![copy],
            Ok(v) if !v.is_empty() => vec![(v, Origin::Named)],
            _ => std::iter::once(copy).chain(system).collect(),
        };
        let Some(blas) = candidates
            .iter()
            .find_map(|(name, origin)| open(name, *origin))
        else {
            return Choice::NotFound(candidates.into_iter().map(|(name, _)| name).collect());
        };
        if FALLBACK_CORES.contains(&blas.core.to_lowercase().as_str()) && has_avx2() {
            return Choice::SlowKernels(blas.core.clone());
        }
        Choice::Blas(blas)
    })
}

/// OpenBLAS, if one is found, usable, and not switched off by `GRAFT_BLAS=gemm`.
pub(crate) fn get() -> Option<&'static Blas> {
    match choice() {
        Choice::Blas(blas) => Some(blas),
        _ => None,
    }
}

/// What a user should know when the products do not run on OpenBLAS: why, and how to get it.
pub(crate) fn notice() -> Option<String> {
    const GEMM: &str = "large products run on the gemm crate";
    match choice() {
        Choice::Blas(_) => None,
        Choice::Gemm => Some(format!("{GEMM} ({ENV}=gemm)")),
        Choice::NotFound(names) => Some(format!(
            "{GEMM}: OpenBLAS was not found ({}), and training runs slower without it (0.58x on \
             the machine the README measures); `graft fetch-blas` puts graft's own copy in its \
             cache (every `cargo xtask` command that runs graft does), or install the system's \
             with `apt-get install libopenblas0-pthread` (Debian, Ubuntu), or name a library in \
             {ENV}",
            names.join(", ")
        )),
        Choice::SlowKernels(core) => Some(format!(
            "{GEMM}: OpenBLAS chose its `{core}` kernels for this CPU, slower than the gemm crate"
        )),
    }
}

/// A symbol of OpenBLAS, under its plain name or the `scipy_` prefix of graft's copy.
///
/// # Safety
/// `T` must be the symbol's type.
unsafe fn symbol<T: Copy>(library: &Library, name: &str) -> Option<T> {
    ["", "scipy_"].iter().find_map(|prefix| {
        let full = format!("{prefix}{name}\0");
        unsafe { library.get::<T>(full.as_bytes()).ok().map(|s| *s) }
    })
}

fn open(name: &str, origin: Origin) -> Option<Blas> {
    // SAFETY: OpenBLAS's initialisers only set up its own thread pool and kernel table.
    let library = unsafe { Library::new(name) }.ok()?;
    unsafe {
        let sgemm = symbol::<Gemm<f32>>(&library, "cblas_sgemm")?;
        let dgemm = symbol::<Gemm<f64>>(&library, "cblas_dgemm")?;
        let sgemv = symbol::<Gemv<f32>>(&library, "cblas_sgemv")?;
        let dgemv = symbol::<Gemv<f64>>(&library, "cblas_dgemv")?;
        type Text = unsafe extern "C" fn() -> *const c_char;
        let text = |f: Text| CStr::from_ptr(f()).to_string_lossy().into_owned();
        let core = text(symbol::<Text>(&library, "openblas_get_corename")?);
        let config = text(symbol::<Text>(&library, "openblas_get_config")?);
        let version = config
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        // graft splits large products over candle's worker pool and calls BLAS from inside
        // parallel loops: OpenBLAS's own pool would oversubscribe the cores, and its idle
        // threads spin in sched_yield (measured: 17% of a step's samples).
        symbol::<unsafe extern "C" fn(c_int)>(&library, "openblas_set_num_threads")?(1);
        Some(Blas {
            sgemm,
            dgemm,
            sgemv,
            dgemv,
            core,
            version,
            origin,
            _library: library,
        })
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The OpenBLAS kernel family for this CPU's features, for `OPENBLAS_CORETYPE`.
pub(crate) fn core_for_this_cpu() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
            return Some("SkylakeX");
        }
        if has_avx2() {
            return Some("Haswell");
        }
    }
    None
}
