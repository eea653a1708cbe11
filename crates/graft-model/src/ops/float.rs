//! The element types the kernels compute in, and reductions written so the compiler keeps
//! them in vector registers.
use super::blas::{Blas, Gemm, Gemv};
use candle_core::WithDType;

/// The element types the kernels are written for.
pub(crate) trait Float: num_traits::Float + WithDType + std::iter::Sum {
    fn erf(self) -> Self;
    /// `e^x`; for f32 a vectorisable approximation within 2 ulp.
    fn exp_fast(self) -> Self;
    /// The BLAS routine for this type.
    fn blas_gemm(blas: &Blas) -> Gemm<Self>;
    /// The BLAS matrix-vector routine for this type.
    fn blas_gemv(blas: &Blas) -> Gemv<Self>;
}

impl Float for f32 {
    #[inline(always)]
    fn erf(self) -> Self {
        super::math::erf(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        super::math::exp(self)
    }
    fn blas_gemm(blas: &Blas) -> Gemm<Self> {
        blas.sgemm
    }
    fn blas_gemv(blas: &Blas) -> Gemv<Self> {
        blas.sgemv
    }
}

impl Float for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    fn blas_gemm(blas: &Blas) -> Gemm<Self> {
        blas.dgemm
    }
    fn blas_gemv(blas: &Blas) -> Gemv<Self> {
        blas.dgemv
    }
}

pub(crate) const LANES: usize = 8;

/// `Σ f(i)` over `0..n` in eight independent partial sums, which the compiler keeps in one
/// vector register (a single running sum is a serial dependency it may not reorder).
#[inline(always)]
pub(crate) fn lane_sum<T: Float>(n: usize, f: impl Fn(usize) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let whole = n / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
    }
    let mut total = acc.iter().copied().sum::<T>();
    for i in whole..n {
        total += f(i);
    }
    total
}

/// The largest element (`-inf` for none), in eight independent lanes.
#[inline(always)]
pub(crate) fn lane_max<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = if x > *a { x } else { *a };
        }
    }
    let rest = chunks.remainder().iter();
    acc.iter()
        .chain(rest)
        .fold(T::neg_infinity(), |m, &x| if x > m { x } else { m })
}
