//! An optional system BLAS (OpenBLAS), opened at run time: on these machines its AVX-512 sgemm
//! runs about twice as fast as the gemm crate's AVX2 kernels (`cargo run --release -p
//! graft-benches --example matmul_rate`). Without one, graft computes with the gemm crate.
//!
//! OpenBLAS picks its kernels from the CPU model when it is loaded; on a virtual CPU it does
//! not recognise it falls back to a decades-old kernel, slower than the gemm crate. So
//! [`crate::runtime::init`] names the kernel family from the CPU's features before loading,
//! and a library whose chosen kernel is such a fallback is not used.
use libloading::Library;
use std::ffi::{c_char, c_int, CStr};
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

pub(crate) const ROW_MAJOR: c_int = 101;
pub(crate) const NO_TRANS: c_int = 111;
pub(crate) const TRANS: c_int = 112;

pub(crate) struct Blas {
    pub sgemm: Gemm<f32>,
    pub dgemm: Gemm<f64>,
    /// The kernel family the library runs, as it reports it.
    pub core: String,
    _library: Library,
}

const LIBRARIES: [&str; 3] = ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"];

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

/// Why the large products run where they do: the outcome of looking for a system BLAS.
pub(crate) enum Choice {
    /// OpenBLAS, running this kernel family.
    Blas(Blas),
    /// `GRAFT_BLAS=off`.
    Off,
    /// No library could be opened under these names.
    NotFound(Vec<String>),
    /// OpenBLAS picked a kernel family older than AVX2, slower than the gemm crate here.
    SlowKernels(String),
}

/// `GRAFT_BLAS`: `off` (or `0`) uses the gemm crate; any other value names the library to open
/// (a file name the loader searches for, or a path); unset, the usual OpenBLAS names.
pub(crate) const ENV: &str = "GRAFT_BLAS";

/// The outcome of looking for a system BLAS, decided once per process.
pub(crate) fn choice() -> &'static Choice {
    static CHOICE: OnceLock<Choice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let names: Vec<String> = match std::env::var(ENV) {
            Ok(v) if v == "off" || v == "0" => return Choice::Off,
            Ok(v) if !v.is_empty() => vec![v],
            _ => LIBRARIES.iter().map(|n| n.to_string()).collect(),
        };
        let Some(blas) = names.iter().find_map(|name| open(name)) else {
            return Choice::NotFound(names);
        };
        if FALLBACK_CORES.contains(&blas.core.to_lowercase().as_str()) && has_avx2() {
            return Choice::SlowKernels(blas.core.clone());
        }
        Choice::Blas(blas)
    })
}

/// The system BLAS, if one is installed, usable, and not switched off by `GRAFT_BLAS=off`.
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
        Choice::Off => Some(format!("{GEMM} ({ENV}=off)")),
        Choice::NotFound(names) => Some(format!(
            "{GEMM}: OpenBLAS was not found ({}), and training runs slower without it (0.58x on \
             the machine the README measures); install it with `apt-get install libopenblas0-pthread` \
             (Debian, Ubuntu), or name the library in {ENV}",
            names.join(", ")
        )),
        Choice::SlowKernels(core) => Some(format!(
            "{GEMM}: OpenBLAS chose its `{core}` kernels for this CPU, slower than the gemm crate"
        )),
    }
}

fn open(name: &str) -> Option<Blas> {
    // SAFETY: OpenBLAS's initialisers only set up its own thread pool and kernel table.
    let library = unsafe { Library::new(name) }.ok()?;
    unsafe {
        let sgemm = *library.get::<Gemm<f32>>(b"cblas_sgemm\0").ok()?;
        let dgemm = *library.get::<Gemm<f64>>(b"cblas_dgemm\0").ok()?;
        let corename = library
            .get::<unsafe extern "C" fn() -> *const c_char>(b"openblas_get_corename\0")
            .ok()?;
        let core = CStr::from_ptr(corename()).to_string_lossy().into_owned();
        // graft splits large products over candle's worker pool and calls BLAS from inside
        // parallel loops: OpenBLAS's own pool would oversubscribe the cores, and its idle
        // threads spin in sched_yield (measured: 17% of a step's samples).
        let set_threads = library
            .get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
            .ok()?;
        set_threads(1);
        Some(Blas {
            sgemm,
            dgemm,
            core,
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
