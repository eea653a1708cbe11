//! Matrix products over raw CPU buffers for the fused kernels, through the system BLAS when
//! there is one, else the gemm crate that candle's own CPU matmul uses. Strided views let a kernel multiply one attention head, or a
//! transposed operand, in place: no copy to make a block contiguous.
use super::blas;
use super::cpu::Float;
use super::parallel::{self, SharedMut};

/// A matrix view: element `(i, j)` lives at `ptr + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    pub ptr: *const T,
    pub row_stride: isize,
    pub col_stride: isize,
}

// A view is only read, under the contract of `gemm`'s callers.
unsafe impl<T> Send for View<T> {}
unsafe impl<T> Sync for View<T> {}

impl<T> View<T> {
    /// A row-major matrix whose rows are `leading` elements apart.
    pub fn rows(ptr: *const T, leading: usize) -> Self {
        Self {
            ptr,
            row_stride: leading as isize,
            col_stride: 1,
        }
    }

    /// The `rows x cols` view as BLAS takes a row-major operand: (transpose flag, leading
    /// dimension), if it is a row-major or a transposed row-major block.
    fn blas_form(&self, rows: usize, cols: usize) -> Option<(std::ffi::c_int, std::ffi::c_int)> {
        let (rs, cs) = (self.row_stride, self.col_stride);
        if cs == 1 && rs >= cols.max(1) as isize {
            Some((blas::NO_TRANS, rs as std::ffi::c_int))
        } else if rs == 1 && cs >= rows.max(1) as isize {
            Some((blas::TRANS, cs as std::ffi::c_int))
        } else {
            None
        }
    }

    /// Where row `i` starts (a method, so that closures capture the whole Send view).
    pub fn row(self, i: usize) -> *const T {
        self.ptr.wrapping_offset(i as isize * self.row_stride)
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

/// Whether a product may be split over the pool's threads (large products) or must stay on
/// the calling thread (per-head products already run inside a parallel loop).
#[derive(Clone, Copy)]
pub(crate) enum Threads {
    Pool,
    Caller,
}

/// What `dst` holds before a product is added to it (see [`gemm_onto`]).
#[derive(Clone, Copy)]
pub(crate) enum Start<'a, T> {
    /// Nothing: the product overwrites it.
    Zero,
    /// What it holds: the product is added.
    Kept,
    /// This row (a bias) in every row, written by the thread that computes those rows.
    Rows(&'a [T]),
}

/// `dst[m, n] = (accumulate ? dst : 0) + scale * a[m, k] · b[k, n]`, with `dst` row-major and
/// its rows `dst_leading` elements apart.
///
/// # Safety
/// Every element the views and `dst` address must be valid; `dst` must not overlap `a` or `b`
/// and no other thread may touch the part of `dst` written here.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: Float>(
    dims: (usize, usize, usize),
    dst: *mut T,
    dst_leading: usize,
    accumulate: bool,
    a: View<T>,
    b: View<T>,
    scale: T,
    threads: Threads,
) {
    let start = if accumulate { Start::Kept } else { Start::Zero };
    unsafe { gemm_onto(dims, dst, dst_leading, start, a, b, scale, threads) }
}

/// `dst[m, n] = start + scale * a[m, k] · b[k, n]`, as [`gemm`].
///
/// # Safety
/// As [`gemm`]; a `Start::Rows` row must hold `n` elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_onto<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_leading: usize,
    start: Start<'_, T>,
    a: View<T>,
    b: View<T>,
    scale: T,
    threads: Threads,
) {
    let dst = SharedMut(dst);
    // Each part sets its own rows' start, so that the copy runs in parallel and leaves them
    // in this core's cache for the product.
    let init = |rows: &std::ops::Range<usize>| {
        if let Start::Rows(row) = start {
            for r in rows.clone() {
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.at(r * dst_leading), n) };
            }
        }
    };
    let accumulate = !matches!(start, Start::Zero);
    if let Some(blas) = blas::get() {
        if let (Some((ta, lda)), Some((tb, ldb))) = (a.blas_form(m, k), b.blas_form(k, n)) {
            let call = |rows: std::ops::Range<usize>| {
                init(&rows);
                let c = |v: usize| v as std::ffi::c_int;
                // Rows `rows` of dst come from the same rows of a.
                let a_rows = a.row(rows.start);
                unsafe {
                    T::blas_gemm(blas)(
                        blas::ROW_MAJOR,
                        ta,
                        tb,
                        c(rows.len()),
                        c(n),
                        c(k),
                        scale,
                        a_rows,
                        lda,
                        b.row(0),
                        ldb,
                        if accumulate { T::one() } else { T::zero() },
                        dst.at(rows.start * dst_leading),
                        c(dst_leading),
                    )
                }
            };
            split_rows(m, n * k, threads, call);
            return;
        }
    }
    // The gemm crate, split the same way, each part on one thread.
    split_rows(m, n * k, threads, |rows| unsafe {
        init(&rows);
        gemm::gemm(
            rows.len(),
            n,
            k,
            dst.at(rows.start * dst_leading),
            1,
            dst_leading as isize,
            accumulate,
            a.row(rows.start),
            a.col_stride,
            a.row_stride,
            b.row(0),
            b.col_stride,
            b.row_stride,
            T::one(),
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    });
}

/// Runs `product(rows)` over row ranges of an `m`-row product whose rows cost `row_work`
/// multiply-adds each: one range per thread for a large product in the pool, else one range.
fn split_rows(
    m: usize,
    row_work: usize,
    threads: Threads,
    product: impl Fn(std::ops::Range<usize>) + Sync,
) {
    let tasks = match threads {
        Threads::Pool if m * row_work >= 1 << 18 => parallel::threads().min(m),
        _ => 1,
    };
    parallel::for_ranges(m, m.div_ceil(tasks.max(1)), product);
}
