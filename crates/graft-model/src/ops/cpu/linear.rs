//! The projection `y = x · Wᵀ + b` and the frozen weights it reads.
use super::data::*;
use crate::ops::float::Float;
use crate::ops::matmul::{gemm, gemm_onto, Start, Threads, View};
use crate::ops::parallel;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};

// ---------------------------------------------------------------------------------------------
// A projection `y = x · Wᵀ + b` whose backward computes only the gradients that are tracked: a
// frozen weight costs no weight gradient (a third of a LoRA step's FLOPs in candle's matmul).
// Frozen and trained weights run the same forward, so a model computes the same logits whether
// its weights are being trained or were reloaded (full fine-tuning's reload test).

pub(crate) struct Linear;

impl Linear {
    /// `[rows, out]` from `x` `[rows, in]`, `w` `[out, in]`, `bias` `[out]`.
    pub(super) fn fwd<T: Float>(x: &[T], w: &[T], bias: Option<&[T]>, out_f: usize) -> Vec<T> {
        let in_f = w.len() / out_f;
        let rows = x.len() / in_f;
        // SAFETY: the product, onto the bias rows or not, writes every element.
        unsafe {
            parallel::written(rows * out_f, |y: *mut T| {
                gemm_onto(
                    (rows, out_f, in_f),
                    y,
                    out_f,
                    bias.map_or(Start::Zero, Start::Rows),
                    View::rows(x.as_ptr(), in_f),
                    View::rows(w.as_ptr(), in_f).t(),
                    T::one(),
                    Threads::Pool,
                );
            })
        }
    }

    /// As [`Linear::fwd`] for a half-precision weight, widened a block of output columns at a
    /// time (see [`widened_blocks`]).
    pub(super) fn fwd_blocked<T: Float>(
        x: &[T],
        w: (&CpuStorage, &Layout),
        bias: Option<&[T]>,
    ) -> Result<Vec<T>> {
        let (out_f, in_f) = (w.1.dims()[0], w.1.dims()[1]);
        product_by_row_blocks(x, (out_f, in_f), bias, |rows| {
            contiguous_rows::<T>(w.0, w.1, in_f, rows)
        })
    }

    /// `dy · W` `[rows, in]` for a half-precision weight, widened a block of its rows at a
    /// time.
    pub(super) fn d_input_blocked<T: Float>(dy: &[T], w: &Tensor) -> Result<Vec<T>> {
        let (out_f, in_f) = w.dims2()?;
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            bail!("graft kernel: tensor is not on the CPU")
        };
        d_input_by_row_blocks(dy, (out_f, in_f), |rows| {
            contiguous_rows::<T>(storage, layout, in_f, rows)
        })
    }

    pub(super) fn cpu_fwd_any(
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        fn typed<T: Float>(
            x: (&CpuStorage, &Layout),
            w: (&CpuStorage, &Layout),
            bias: Option<(&CpuStorage, &Layout)>,
        ) -> Result<CpuStorage> {
            let out_f = w.1.dims()[0];
            let bias = bias.map(|(s, l)| contiguous::<T>(s, l)).transpose()?;
            let x = contiguous::<T>(x.0, x.1)?;
            let y = if is_half(w.0.dtype()) {
                Linear::fwd_blocked(&x, w, bias.as_deref())?
            } else {
                Linear::fwd(&x, &contiguous::<T>(w.0, w.1)?, bias.as_deref(), out_f)
            };
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = for_float!(x.0, "graft-linear", T => typed::<T>(x, w, bias)?);
        let mut dims = x.1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = w.1.dims()[0];
        }
        Ok((out, Shape::from(dims)))
    }

    /// `(dx, dW, db)`, each only where its tensor is tracked.
    pub(super) fn bwd_typed<T: Float>(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (out_f, in_f) = w.dims2()?;
        let rows = x.elem_count() / in_f;
        with_data::<T, _>(&grad, |dy| {
            let dx = if x.track_op() {
                let weight = FrozenWeight::Dense(w.contiguous()?);
                Some(tensor(weight.d_input::<T>(dy)?, x)?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let dw = with_data::<T, _>(x, |xs| {
                    // SAFETY: the product (not accumulated) writes every element.
                    Ok(unsafe {
                        parallel::written(w.elem_count(), |dw| {
                            gemm(
                                (out_f, in_f, rows),
                                dw,
                                in_f,
                                false,
                                View::rows(dy.as_ptr(), out_f).t(),
                                View::rows(xs.as_ptr(), in_f),
                                T::one(),
                                Threads::Pool,
                            )
                        })
                    })
                })?;
                Some(tensor(dw, w)?)
            } else {
                None
            };
            let db = match bias {
                Some(b) if b.track_op() => {
                    let mut db = vec![T::zero(); out_f];
                    for row in dy.chunks(out_f) {
                        for (d, &g) in db.iter_mut().zip(row) {
                            *d += g;
                        }
                    }
                    Some(tensor(db, b)?)
                }
                _ => None,
            };
            Ok((dx, dw, db))
        })
    }

    pub(super) fn bwd_any(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        for_dtype!(x.dtype(), T => Self::bwd_typed::<T>(x, w, bias, grad))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "graft-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::cpu_fwd_any((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::bwd_any(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "graft-linear"
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
        Self::cpu_fwd_any((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::bwd_any(x, w, Some(b), grad)
    }
}

/// A frozen weight `[out, in]` as a fused kernel (or, off them, `ops::linear`'s frozen
/// product) reads it.
pub(crate) enum FrozenWeight {
    /// Contiguous for the kernels; half precision is widened a block of rows at a time.
    Dense(Tensor),
    /// Dequantized a block of rows at a time.
    Quantized(crate::quant::QuantizedWeight),
}

impl FrozenWeight {
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Quantized(q) => Ok(q.dims()),
        }
    }

    /// The whole weight in `dtype`, a quantized one dequantized (and not kept): what the
    /// compositions off the kernels multiply by.
    pub(crate) fn whole(&self, dtype: candle_core::DType) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_dtype(dtype),
            Self::Quantized(q) => q.dequantize()?.to_dtype(dtype),
        }
    }

    /// `x · Wᵀ + bias`, `[rows, out]`.
    pub(super) fn product<T: Float>(&self, x: &[T], bias: Option<&[T]>) -> Result<Vec<T>> {
        let (out_f, in_f) = self.dims()?;
        match self {
            Self::Dense(w) if is_half(w.dtype()) => {
                let (storage, layout) = w.storage_and_layout();
                let Storage::Cpu(storage) = &*storage else {
                    bail!("graft kernel: tensor is not on the CPU")
                };
                Linear::fwd_blocked(x, (storage, layout), bias)
            }
            Self::Dense(w) => with_data::<T, _>(w, |w| Ok(Linear::fwd(x, w, bias, out_f))),
            Self::Quantized(q) => product_by_row_blocks(x, (out_f, in_f), bias, |rows| {
                dequantized_rows::<T>(q, rows)
            }),
        }
    }

    /// `dy · W`, `[rows, in]`.
    pub(super) fn d_input<T: Float>(&self, dy: &[T]) -> Result<Vec<T>> {
        let (out_f, in_f) = self.dims()?;
        match self {
            Self::Dense(w) if is_half(w.dtype()) => Linear::d_input_blocked(dy, w),
            Self::Dense(w) => with_data::<T, _>(w, |w| {
                let rows = dy.len() / out_f.max(1);
                // SAFETY: the product (not accumulated) writes every element.
                Ok(unsafe {
                    parallel::written(rows * in_f, |dx| {
                        gemm(
                            (rows, in_f, out_f),
                            dx,
                            in_f,
                            false,
                            View::rows(dy.as_ptr(), out_f),
                            View::rows(w.as_ptr(), in_f),
                            T::one(),
                            Threads::Pool,
                        )
                    })
                })
            }),
            Self::Quantized(q) => {
                d_input_by_row_blocks(dy, (out_f, in_f), |rows| dequantized_rows::<T>(q, rows))
            }
        }
    }
}
