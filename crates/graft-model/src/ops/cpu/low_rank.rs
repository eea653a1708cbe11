//! A frozen projection with low-rank updates of blocks of its output columns (LoRA, AdaLoRA).
use super::data::*;
use super::linear::FrozenWeight;
use crate::ops::float::Float;
use crate::ops::matmul::{gemm, Threads, View};
use crate::ops::parallel;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

// ---------------------------------------------------------------------------------------------
// A frozen projection with low-rank updates of blocks of its output columns,
// `y[:, cols_i] += (x ⊙ m) · A_iᵀ · B_iᵀ` (LoRA, AdaLoRA; several when query, key and value run
// as one packed product), as one graph node over (x, A, B): the A_i stacked by rows, the B_i
// flattened one after the other. Composed, each update's sum and each second consumer of x
// cost candle's backward a zeroed gradient and an add; here the updates are accumulated into
// the product's output by the BLAS calls, forward and backward.

/// One update: output columns `columns` get `down[:, ranks] · Bᵀ`, B being the `[columns,
/// ranks]` row-major block at `b_offset` of the flattened B input.
#[derive(Clone, Debug)]
pub(crate) struct UpdateBlock {
    pub columns: std::ops::Range<usize>,
    pub ranks: std::ops::Range<usize>,
    pub b_offset: usize,
}

pub(crate) struct LowRankLinear {
    /// Frozen (the composition handles a trained weight).
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    /// Dropout's keep mask, contiguous, the shape of x.
    pub mask: Option<Tensor>,
    /// Disjoint, their ranks covering A's rows and their B blocks the whole B input.
    pub blocks: Vec<UpdateBlock>,
}

/// Where the factors of a low-rank product live.
#[derive(Clone, Copy)]
struct Factors<T> {
    a: *const T,
    b: *const T,
    in_f: usize,
    out_f: usize,
    rank: usize,
}

impl LowRankLinear {
    /// `x ⊙ mask`, or x itself.
    fn masked<'a, T: Float>(x: &'a [T], mask: Option<&[T]>) -> std::borrow::Cow<'a, [T]> {
        match mask {
            Some(m) => x.iter().zip(m).map(|(&x, &m)| x * m).collect(),
            None => x.into(),
        }
    }

    /// The frozen bias' and mask's data: `f(bias, mask)`.
    fn with_frozen<T: Float, R>(
        &self,
        f: impl FnOnce(Option<&[T]>, Option<&[T]>) -> Result<R>,
    ) -> Result<R> {
        with_optional::<T, _>(self.bias.as_ref(), |bias| {
            with_optional::<T, _>(self.mask.as_ref(), |mask| f(bias, mask))
        })
    }

    /// `down = xm · Aᵀ`, `[rows, rank]`.
    fn down<T: Float>(xm: &[T], f: Factors<T>) -> Vec<T> {
        product(
            (xm.len() / f.in_f, f.rank, f.in_f),
            View::rows(xm.as_ptr(), f.in_f),
            View::rows(f.a, f.in_f).t(),
        )
    }

    /// Adds every block's `down[:, ranks] · Bᵀ` into its columns of `y` (`[rows, out]`).
    ///
    /// # Safety
    /// `y` must hold `rows * out_f` elements that no other thread touches.
    unsafe fn add_updates<T: Float>(&self, y: *mut T, down: &[T], f: Factors<T>) {
        let rows = down.len() / f.rank.max(1);
        for block in &self.blocks {
            let r = block.ranks.len();
            unsafe {
                gemm(
                    (rows, block.columns.len(), r),
                    y.add(block.columns.start),
                    f.out_f,
                    true,
                    View::rows(down.as_ptr().add(block.ranks.start), f.rank),
                    View::rows(f.b.add(block.b_offset), r).t(),
                    T::one(),
                    Threads::Pool,
                )
            };
        }
    }

    fn fwd<T: Float>(&self, x: &[T], a: &[T], b: &[T]) -> Result<Vec<T>> {
        self.with_frozen::<T, _>(|bias, mask| {
            let (out_f, in_f) = self.weight.dims()?;
            let f = Factors {
                a: a.as_ptr(),
                b: b.as_ptr(),
                in_f,
                out_f,
                rank: a.len() / in_f,
            };
            let down = Self::down(&Self::masked(x, mask), f);
            let mut y = self.weight.product(x, bias)?;
            // SAFETY: y holds rows x out elements, and nobody else touches it.
            unsafe { self.add_updates(y.as_mut_ptr(), &down, f) };
            Ok(y)
        })
    }

    /// `(dx, dA, dB)`, each only where its tensor is tracked.
    fn bwd_typed<T: Float>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (out_f, in_f) = self.weight.dims()?;
        let rank = a.dims2()?.0;
        let rows = x.elem_count() / in_f;
        self.with_frozen::<T, _>(|_, mask| {
            with_data::<T, _>(&grad, |dy| {
                with_data::<T, _>(x, |xs| {
                    with_data::<T, _>(a, |av| {
                        with_data::<T, _>(b, |bv| {
                            let f = Factors {
                                a: av.as_ptr(),
                                b: bv.as_ptr(),
                                in_f,
                                out_f,
                                rank,
                            };
                            // t = dy[:, columns] · B per block, `[rows, rank]`: the gradient
                            // at the updates' bottleneck.
                            // SAFETY: the blocks' ranks cover every column of t.
                            let t = unsafe {
                                parallel::written(rows * rank, |t: *mut T| {
                                    for block in &self.blocks {
                                        let r = block.ranks.len();
                                        gemm(
                                            (rows, r, block.columns.len()),
                                            t.add(block.ranks.start),
                                            rank,
                                            false,
                                            View::rows(dy.as_ptr().add(block.columns.start), out_f),
                                            View::rows(bv.as_ptr().add(block.b_offset), r),
                                            T::one(),
                                            Threads::Pool,
                                        );
                                    }
                                })
                            };
                            let t_v = View::rows(t.as_ptr(), rank);
                            let dx = if x.track_op() {
                                let mut dx = self.weight.d_input(dy)?;
                                if mask.is_none() {
                                    // SAFETY: dx holds rows x in_f elements.
                                    unsafe {
                                        gemm(
                                            (rows, in_f, rank),
                                            dx.as_mut_ptr(),
                                            in_f,
                                            true,
                                            t_v,
                                            View::rows(av.as_ptr(), in_f),
                                            T::one(),
                                            Threads::Pool,
                                        )
                                    };
                                }
                                if let Some(mask) = mask {
                                    let update = product(
                                        (rows, in_f, rank),
                                        t_v,
                                        View::rows(av.as_ptr(), in_f),
                                    );
                                    for ((d, u), m) in dx.iter_mut().zip(&update).zip(mask) {
                                        *d += *u * *m;
                                    }
                                }
                                Some(tensor(dx, x)?)
                            } else {
                                None
                            };
                            let xm = Self::masked(xs, mask);
                            let da = a
                                .track_op()
                                .then(|| {
                                    let xm_v = View::rows(xm.as_ptr(), in_f);
                                    tensor(product((rank, in_f, rows), t_v.t(), xm_v), a)
                                })
                                .transpose()?;
                            let db = if b.track_op() {
                                let down = Self::down(&xm, f);
                                // SAFETY: the blocks' B blocks cover the whole of dB.
                                let db = unsafe {
                                    parallel::written(b.elem_count(), |db: *mut T| {
                                        for block in &self.blocks {
                                            let r = block.ranks.len();
                                            gemm(
                                                (block.columns.len(), r, rows),
                                                db.add(block.b_offset),
                                                r,
                                                false,
                                                View::rows(
                                                    dy.as_ptr().add(block.columns.start),
                                                    out_f,
                                                )
                                                .t(),
                                                View::rows(
                                                    down.as_ptr().add(block.ranks.start),
                                                    rank,
                                                ),
                                                T::one(),
                                                Threads::Pool,
                                            );
                                        }
                                    })
                                };
                                Some(tensor(db, b)?)
                            } else {
                                None
                            };
                            Ok((dx, da, db))
                        })
                    })
                })
            })
        })
    }
}

impl CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        "graft-low-rank-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(s1, "graft-low-rank-linear", T => T::to_cpu_storage_owned(
            self.fwd::<T>(&contiguous(s1, l1)?, &contiguous(s2, l2)?, &contiguous(s3, l3)?)?
        ));
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.weight.dims()?.0;
        }
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        for_dtype!(x.dtype(), T => self.bwd_typed::<T>(x, a, b, grad))
    }
}
