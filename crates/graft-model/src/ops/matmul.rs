//! Matrix products over raw CPU buffers for the fused kernels, through the gemm crate that
//! candle's own CPU matmul uses. Strided views let a kernel multiply one attention head, or a
//! transposed operand, in place: no copy to make a block contiguous.
use super::cpu::Float;

/// A matrix view: element `(i, j)` lives at `ptr + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    pub ptr: *const T,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl<T> View<T> {
    /// A row-major matrix whose rows are `leading` elements apart.
    pub fn rows(ptr: *const T, leading: usize) -> Self {
        Self {
            ptr,
            row_stride: leading as isize,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no data moves).
    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// Whether a product may use the rayon pool (large products) or must stay on the calling
/// thread (per-head products already run inside a parallel loop).
#[derive(Clone, Copy)]
pub(crate) enum Threads {
    Pool,
    Caller,
}

/// `dst[m, n] = (accumulate ? dst : 0) + scale * a[m, k] · b[k, n]`, with `dst` row-major and
/// its rows `dst_leading` elements apart.
///
/// # Safety
/// Every element the views and `dst` address must be valid; `dst` must not overlap `a` or `b`
/// and no other thread may touch the part of `dst` written here.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_leading: usize,
    accumulate: bool,
    a: View<T>,
    b: View<T>,
    scale: T,
    threads: Threads,
) {
    let parallelism = match threads {
        Threads::Pool if m * n * k >= 1 << 18 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    // gemm computes dst = alpha * dst + beta * a · b (alpha is read only when read_dst is set).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_leading as isize,
            accumulate,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            T::one(),
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A raw pointer that parallel tasks may share because each writes a disjoint block.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub *mut T);
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer `offset` elements in (a method, so that closures capture the whole wrapper).
    pub fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// A read-only counterpart of [`SharedMut`].
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub *const T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub fn at(self, offset: usize) -> *const T {
        self.0.wrapping_add(offset)
    }
}
