//! Parallel loops on candle's own CPU worker pool (the calling thread plus its workers).
//!
//! candle 0.11 runs its elementwise ops on that pool; kernels on a second pool (rayon's global
//! one) would leave one pool's idle workers spinning while the other works, more runnable
//! threads than cores (measured: 7% of a step's samples in idle spinning on 2 cores).
//! A closure given here must not call candle ops: the pool does not nest.
use std::ops::Range;

/// Threads a loop is split over.
pub(crate) fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// Calls `f` with consecutive ranges that together cover `0..n`, each at least `grain` long
/// (but the last), on the pool's threads.
pub(crate) fn for_ranges(n: usize, grain: usize, f: impl Fn(Range<usize>) + Sync) {
    let grain = grain.max(1);
    let blocks = n.div_ceil(grain);
    if blocks <= 1 {
        if n > 0 {
            f(0..n);
        }
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(blocks, |b| {
        f(b.start * grain..(b.end * grain).min(n));
    });
}

/// A pointer that parallel tasks share because each writes a disjoint part of its buffer.
pub(crate) struct SharedMut<T>(pub *mut T);
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(buffer: &mut [T]) -> Self {
        Self(buffer.as_mut_ptr())
    }

    /// The pointer `offset` elements in (a method, so that closures capture the whole wrapper).
    pub fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }

    /// Elements `range` of the buffer.
    ///
    /// # Safety
    /// `range` lies inside the buffer and no other task touches it meanwhile.
    pub unsafe fn slice<'a>(self, range: Range<usize>) -> &'a mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(range.start), range.len()) }
    }
}

/// A read-only counterpart of [`SharedMut`].
pub(crate) struct Shared<T>(pub *const T);
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub fn at(self, offset: usize) -> *const T {
        self.0.wrapping_add(offset)
    }
}

/// A new buffer of `len` elements filled in parallel, `f(range, part)` for ranges whose starts
/// and lengths are multiples of `grain` (but the last length), without zeroing it first
/// (zeroing every kernel output was 6% of a forward pass).
///
/// # Safety
/// `f` must write every element of the part it is given.
pub(crate) unsafe fn fill<T: Send>(
    len: usize,
    grain: usize,
    f: impl Fn(Range<usize>, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    let shared = SharedMut(out.spare_capacity_mut().as_mut_ptr());
    for_ranges(len, grain, |range| {
        // SAFETY: the ranges are disjoint and inside the buffer's capacity.
        let part = unsafe { shared.slice(range.clone()) };
        f(range, part)
    });
    // SAFETY: every element was written (the caller's contract).
    unsafe { out.set_len(len) };
    out
}

/// A new buffer of `len` elements that `init` writes, every one, through the pointer it gets.
///
/// # Safety
/// `init` must write all `len` elements.
pub(crate) unsafe fn written<T>(len: usize, init: impl FnOnce(*mut T)) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    init(out.spare_capacity_mut().as_mut_ptr().cast());
    // SAFETY: every element was written (the caller's contract).
    unsafe { out.set_len(len) };
    out
}

/// As [`fill`], with a row of `width` sums beside: `f(range, part, sums)` adds its part's
/// contribution into `sums` (zeroed, one row per part), and the rows are added up after.
/// Returns the buffer and the total sums (layer norm's dgamma and dbeta, a scale's gradient).
///
/// # Safety
/// `f` must write every element of the part it is given.
pub(crate) unsafe fn fill_summing<T>(
    len: usize,
    grain: usize,
    width: usize,
    f: impl Fn(Range<usize>, &mut [std::mem::MaybeUninit<T>], &mut [T]) + Sync,
) -> (Vec<T>, Vec<T>)
where
    T: Send + Copy + num_traits::Zero + std::ops::AddAssign,
{
    let grain = grain.max(1);
    // One row per part, at the index of its first grain (parts start on grain boundaries).
    let mut partials = vec![T::zero(); len.div_ceil(grain) * width];
    let shared = SharedMut::new(&mut partials);
    // SAFETY: each part owns the row of its first grain; the caller writes every element.
    let out = unsafe {
        fill(len, grain, |range, part| {
            let row = range.start / grain;
            f(range, part, shared.slice(row * width..(row + 1) * width))
        })
    };
    let mut sums = vec![T::zero(); width];
    for row in partials.chunks(width.max(1)) {
        for (total, &x) in sums.iter_mut().zip(row) {
            *total += x;
        }
    }
    (out, sums)
}
