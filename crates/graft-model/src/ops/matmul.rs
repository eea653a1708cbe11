//! Matrix products over raw CPU buffers for the fused kernels, through the system BLAS when
//! there is one, else the gemm crate that candle's own CPU matmul uses. Strided views let a kernel multiply one attention head, or a
//! transposed operand, in place: no copy to make a block contiguous.
use super::blas;
use super::float::Float;
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

    /// Where column `j` starts.
    pub fn col(self, j: usize) -> *const T {
        self.ptr.wrapping_offset(j as isize * self.col_stride)
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
    // Each block sets its own rows' start, so that the copy runs in parallel and leaves them
    // in this core's cache for the product.
    let init = |block: &Block| {
        if let Start::Rows(row) = start {
            for r in block.rows.clone() {
                let src = &row[block.cols.clone()];
                let at = dst.at(r * dst_leading + block.cols.start);
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), at, src.len()) };
            }
        }
    };
    let accumulate = !matches!(start, Start::Zero);
    if let Some(blas) = blas::get() {
        if let (Some((ta, lda)), Some((tb, ldb))) = (a.blas_form(m, k), b.blas_form(k, n)) {
            let c = |v: usize| v as std::ffi::c_int;
            // A one-row product (each token of greedy decoding) as a matrix-vector product:
            // sgemm would first pack all of b, which it then reads once (packing was 42% of a
            // generation's samples in `perf`).
            if m == 1 && a.col_stride >= 1 {
                // dst[cols] += scale · b[:, cols]ᵀ · a[0, :]; b as stored is either the [n, k]
                // matrix itself (transposed view) or [k, n].
                split((m, n, k), threads, |block| {
                    init(&block);
                    let (cols, at) = (block.cols.len(), dst.at(block.cols.start));
                    if !accumulate {
                        // Zeroed here rather than by beta = 0: OpenBLAS versions differ on
                        // whether beta = 0 overwrites a NaN already in dst.
                        unsafe { std::ptr::write_bytes(at, 0, cols) };
                    }
                    let (trans, rows, cols) = if tb == blas::TRANS {
                        (blas::NO_TRANS, cols, k)
                    } else {
                        (blas::TRANS, k, cols)
                    };
                    unsafe {
                        T::blas_gemv(blas)(
                            blas::ROW_MAJOR,
                            trans,
                            c(rows),
                            c(cols),
                            scale,
                            b.col(block.cols.start),
                            ldb,
                            a.row(0),
                            c(a.col_stride as usize),
                            T::one(),
                            at,
                            1,
                        )
                    };
                });
                return;
            }
            split((m, n, k), threads, |block| {
                init(&block);
                unsafe {
                    T::blas_gemm(blas)(
                        blas::ROW_MAJOR,
                        ta,
                        tb,
                        c(block.rows.len()),
                        c(block.cols.len()),
                        c(k),
                        scale,
                        a.row(block.rows.start),
                        lda,
                        b.col(block.cols.start),
                        ldb,
                        if accumulate { T::one() } else { T::zero() },
                        dst.at(block.rows.start * dst_leading + block.cols.start),
                        c(dst_leading),
                    )
                }
            });
            return;
        }
    }
    // The gemm crate, split the same way, each block on one thread.
    split((m, n, k), threads, |block| unsafe {
        init(&block);
        gemm::gemm(
            block.rows.len(),
            block.cols.len(),
            k,
            dst.at(block.rows.start * dst_leading + block.cols.start),
            1,
            dst_leading as isize,
            accumulate,
            a.row(block.rows.start),
            a.col_stride,
            a.row_stride,
            b.col(block.cols.start),
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

/// The rows and columns of `dst` one thread computes.
struct Block {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

/// Runs `product(block)` over blocks of an `m x n` product with inner size `k`: one block per
/// thread for a large product in the pool, else the whole. Each thread packs the whole of the
/// operand it shares (b when rows are split, a when columns are), so the cut goes across the
/// longer side of dst: the less packing per thread, and a one-row product (a decoder's step
/// while generating) still runs on every thread.
fn split((m, n, k): (usize, usize, usize), threads: Threads, product: impl Fn(Block) + Sync) {
    let tasks = match threads {
        Threads::Pool if m * n * k >= 1 << 18 => parallel::threads(),
        _ => 1,
    };
    if n > m && tasks > 1 {
        parallel::for_ranges(n, n.div_ceil(tasks.min(n)), |cols| {
            product(Block { rows: 0..m, cols })
        });
    } else {
        parallel::for_ranges(m, m.div_ceil(tasks.min(m).max(1)), |rows| {
            product(Block { rows, cols: 0..n })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cut (rows for a tall product, columns for a wide one, one block for a small one)
    /// against the plain triple loop, with a bias start, an accumulated start, a transposed
    /// operand and a destination wider than the product.
    #[test]
    fn every_cut_gives_the_plain_product() {
        for (m, n, k) in [
            (1, 700, 600),
            (3, 900, 200),
            (700, 5, 400),
            (300, 300, 300),
            (4, 4, 4),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
                .collect();
            // b stored as its transpose [n, k], read through a transposed view, and as [k, n].
            let b_t: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
                .collect();
            let b_rows: Vec<f32> = (0..k * n).map(|i| b_t[(i % n) * k + i / n]).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 / 100.0).collect();
            let leading = n + 3;
            let expected = |i: usize, j: usize| -> f32 {
                (0..k).map(|p| a[i * k + p] * b_t[j * k + p]).sum::<f32>() * 0.5
            };
            let layouts = [
                ("transposed b", View::rows(b_t.as_ptr(), k).t()),
                ("row-major b", View::rows(b_rows.as_ptr(), n)),
            ];
            for ((start, name), (layout, b)) in [
                (Start::Rows(&bias[..]), "bias"),
                (Start::Kept, "kept"),
                (Start::Zero, "zero"),
            ]
            .into_iter()
            .flat_map(|s| layouts.map(|l| (s, l)))
            {
                let mut dst = vec![1.0f32; m * leading];
                unsafe {
                    gemm_onto(
                        (m, n, k),
                        dst.as_mut_ptr(),
                        leading,
                        start,
                        View::rows(a.as_ptr(), k),
                        b,
                        0.5,
                        Threads::Pool,
                    )
                };
                for i in 0..m {
                    for j in 0..leading {
                        let got = dst[i * leading + j];
                        let want = match (j < n, start) {
                            (false, _) => 1.0,
                            (true, Start::Rows(row)) => row[j] + expected(i, j),
                            (true, Start::Kept) => 1.0 + expected(i, j),
                            (true, Start::Zero) => expected(i, j),
                        };
                        assert!(
                            (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                            "{m}x{n}x{k} {name}, {layout} [{i}, {j}]: {got} against {want}"
                        );
                    }
                }
            }
        }
    }
}
