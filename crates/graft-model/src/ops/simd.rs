//! Elementwise loops compiled for the widest vector unit the CPU has, chosen at run time.
//!
//! graft's binaries target baseline x86-64 (SSE2, 4 lanes) so that they run anywhere; a loop
//! run through [`vectorized`] is compiled again with AVX2 (8 lanes) and AVX-512 (16 lanes) and
//! the CPU's best is used. The loop is a [`Loop`] whose `run` is `#[inline(always)]`, so that
//! it is compiled inside each target-feature function (a closure would not be: measured, it
//! stayed an out-of-line SSE function).
use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
                return Level::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// A loop body to compile for the CPU's vector unit; `run` must be `#[inline(always)]`.
pub(crate) trait Loop {
    fn run(self);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn avx512(body: impl Loop) {
    body.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(body: impl Loop) {
    body.run()
}

/// Runs `body`, compiled for this CPU's widest vector unit.
#[inline(always)]
pub(crate) fn vectorized(body: impl Loop) {
    match level() {
        // SAFETY: the CPU has the features these were compiled for (checked in `level`).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { avx512(body) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2(body) },
        Level::Baseline => body.run(),
    }
}
