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

/// The system BLAS, if one is installed, usable, and not switched off by `GRAFT_BLAS=off`.
pub(crate) fn get() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        if std::env::var("GRAFT_BLAS").is_ok_and(|v| v == "off" || v == "0") {
            return None;
        }
        let blas = LIBRARIES.iter().find_map(|name| open(name))?;
        let fallback = FALLBACK_CORES.contains(&blas.core.to_lowercase().as_str());
        (!fallback || !has_avx2()).then_some(blas)
    })
    .as_ref()
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
