//! Process-wide settings for a long computation, made once at the start of `main`, before any
//! thread exists (they change environment and allocator state that threads read).
//!
//! - The allocator keeps freed memory instead of returning it to the kernel at once. A training
//!   step frees and reallocates the same few hundred MiB of activations; with glibc's defaults
//!   each reallocation faults its pages in again. Measured: a MiniLM LoRA step went from 2.17 s
//!   to 1.29 s, a third of the time having been page faults (docs/performance.md). It never
//!   trims the heap: a SmolLM2 step frees more than any threshold (1.2 GB of activations), and
//!   with trimming at 1 GiB every step faulted them in again (1.84 M page faults in 8 steps
//!   against 0.56 M, 1.81 s a step against 1.63 s). The peak RSS is the same either way.
//! - OpenBLAS is told which kernels this CPU can run (see [`crate::ops`]'s BLAS notes).
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1); // never trim (see above)
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() {
        if let Some(core) = crate::ops::blas_core_for_this_cpu() {
            std::env::set_var("OPENBLAS_CORETYPE", core);
        }
    }
}

/// The device graft computes on: the first CUDA GPU when built with `--features cuda`, unless
/// `GRAFT_DEVICE=cpu` asks for the CPU (a CUDA build's reference side on the GPU machine itself:
/// the GPU kit compares the GPU's logits with the CPU's there).
pub fn default_device() -> crate::error::Result<candle_core::Device> {
    match std::env::var("GRAFT_DEVICE").ok().as_deref() {
        None | Some("") => build_device(),
        Some("cpu") => Ok(candle_core::Device::Cpu),
        Some("cuda") if cfg!(feature = "cuda") => build_device(),
        Some(other) => Err(crate::error::Error::DeviceName {
            given: other.to_string(),
            known: if cfg!(feature = "cuda") {
                "`cpu` or `cuda`"
            } else {
                "`cpu` only"
            },
        }),
    }
}

fn build_device() -> crate::error::Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        Ok(candle_core::Device::new_cuda(0)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(candle_core::Device::Cpu)
    }
}
