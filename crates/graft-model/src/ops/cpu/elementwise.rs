//! Element-wise kernels: column scaling (IA3), GELU, SwiGLU and rotary positions.
use super::data::*;
use crate::ops::float::Float;
use crate::ops::parallel;
use crate::ops::simd::{vectorized, Loop};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use std::mem::MaybeUninit;

// ---------------------------------------------------------------------------------------------
// Scaling the last dimension by a vector: `y = x ⊙ l` (IA3). candle's broadcast multiply
// reduces dl over the token dimensions with a single-threaded strided sum (13% of an IA3 step).

pub(crate) struct ScaleColumns;

struct ScaleRows<'a, T> {
    x: &'a [T],
    scale: &'a [T],
    y: &'a mut [MaybeUninit<T>],
}

impl<T: Float> Loop for ScaleRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        let n = self.scale.len();
        for (y, x) in self.y.chunks_mut(n).zip(self.x.chunks(n)) {
            for j in 0..n {
                y[j] = MaybeUninit::new(x[j] * self.scale[j]);
            }
        }
    }
}

/// dx = dy ⊙ l, and Σ over rows of dy ⊙ x added into `dl`.
struct ScaleBackwardRows<'a, T> {
    x: &'a [T],
    scale: &'a [T],
    dy: &'a [T],
    dx: &'a mut [MaybeUninit<T>],
    dl: &'a mut [T],
}

impl<T: Float> Loop for ScaleBackwardRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        let n = self.scale.len();
        for ((dx, x), dy) in self
            .dx
            .chunks_mut(n)
            .zip(self.x.chunks(n))
            .zip(self.dy.chunks(n))
        {
            for j in 0..n {
                dx[j] = MaybeUninit::new(dy[j] * self.scale[j]);
                self.dl[j] += dy[j] * x[j];
            }
        }
    }
}

impl ScaleColumns {
    pub(super) fn fwd<T: Float>(x: &[T], scale: &[T]) -> Vec<T> {
        let n = scale.len();
        // SAFETY: every element of whole rows is written.
        unsafe {
            parallel::fill(x.len(), rows_per_task(n) * n, |range, y| {
                vectorized(ScaleRows {
                    x: &x[range],
                    scale,
                    y,
                })
            })
        }
    }

    pub(super) fn bwd<T: Float>(x: &[T], scale: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let n = scale.len();
        let part = |range: std::ops::Range<usize>, dx: &mut [MaybeUninit<T>], dl: &mut [T]| {
            vectorized(ScaleBackwardRows {
                x: &x[range.clone()],
                scale,
                dy: &dy[range],
                dx,
                dl,
            })
        };
        // SAFETY: every element of whole rows is written.
        let (dx, dl) = unsafe { parallel::fill_summing(x.len(), rows_per_task(n) * n, n, part) };
        (dx, dl)
    }

    pub(super) fn bwd_typed<T: Float>(
        x: &Tensor,
        scale: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dl) = with_data::<T, _>(x, |xs| {
            with_data::<T, _>(scale, |l| {
                with_data::<T, _>(&grad, |dy| Ok(Self::bwd(xs, l, dy)))
            })
        })?;
        Ok((gradient(dx, x)?, gradient(dl, scale)?))
    }
}

impl CustomOp2 for ScaleColumns {
    fn name(&self) -> &'static str {
        "graft-scale-columns"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(s1, "graft-scale-columns", T => T::to_cpu_storage_owned(
            Self::fwd::<T>(&contiguous(s1, l1)?, &contiguous(s2, l2)?)
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        for_dtype!(x.dtype(), T => Self::bwd_typed::<T>(x, scale, grad))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU with the exact (erf) form, as BERT's "gelu".

pub(crate) struct GeluErf;

struct GeluRows<'a, T> {
    x: &'a [T],
    y: &'a mut [MaybeUninit<T>],
}

impl<T: Float> Loop for GeluRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        let half = T::from_f64(0.5);
        let inv_sqrt2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
        for (y, &x) in self.y.iter_mut().zip(self.x) {
            *y = MaybeUninit::new(half * x * (T::one() + (x * inv_sqrt2).erf()));
        }
    }
}

/// d/dx = Φ(x) + x φ(x).
struct GeluBackwardRows<'a, T> {
    x: &'a [T],
    dy: &'a [T],
    dx: &'a mut [MaybeUninit<T>],
}

impl<T: Float> Loop for GeluBackwardRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        let half = T::from_f64(0.5);
        let inv_sqrt2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
        let inv_sqrt_2pi = T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
        for ((dx, &x), &dy) in self.dx.iter_mut().zip(self.x).zip(self.dy) {
            let cdf = half * (T::one() + (x * inv_sqrt2).erf());
            let pdf = (-half * x * x).exp_fast() * inv_sqrt_2pi;
            *dx = MaybeUninit::new(dy * (cdf + x * pdf));
        }
    }
}

impl GeluErf {
    pub(super) fn fwd<T: Float>(x: &[T]) -> Vec<T> {
        // SAFETY: every element of each part is written.
        unsafe {
            parallel::fill(x.len(), 16384, |range, y| {
                vectorized(GeluRows { x: &x[range], y })
            })
        }
    }

    pub(super) fn bwd<T: Float>(x: &[T], dy: &[T]) -> Vec<T> {
        // SAFETY: every element of each part is written.
        unsafe {
            parallel::fill(x.len(), 16384, |range, dx| {
                vectorized(GeluBackwardRows {
                    x: &x[range.clone()],
                    dy: &dy[range],
                    dx,
                })
            })
        }
    }

    pub(super) fn bwd_typed<T: Float>(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let grad = grad.contiguous()?;
        let dx = with_data::<T, _>(x, |xs| with_data::<T, _>(&grad, |dy| Ok(Self::bwd(xs, dy))))?;
        tensor(dx, x)
    }
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "graft-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(storage, "graft-gelu-erf", T => T::to_cpu_storage_owned(
            Self::fwd::<T>(&contiguous(storage, layout)?)
        ));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            for_dtype!(x.dtype(), T => Self::bwd_typed::<T>(x, grad)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU's gated product `y = silu(g) ⊙ u` (Llama's and ChatGLM's feed-forward). Composed,
// candle keeps silu(g) beside g and u (a third `[tokens, ffn]` activation per layer) and, for
// half precision, runs its element-wise ops one converted element at a time.

pub(crate) struct Swiglu;

/// `silu(g) = g σ(g)`, with σ from the vectorisable exponential.
#[inline(always)]
fn sigmoid<T: Float>(g: T) -> T {
    T::one() / (T::one() + (-g).exp_fast())
}

struct SwigluRows<'a, T> {
    g: &'a [T],
    u: &'a [T],
    y: &'a mut [MaybeUninit<T>],
}

impl<T: Float> Loop for SwigluRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        for ((y, &g), &u) in self.y.iter_mut().zip(self.g).zip(self.u) {
            *y = MaybeUninit::new(g * sigmoid(g) * u);
        }
    }
}

/// dg = dy u σ(g) (1 + g (1 - σ(g))), or du = dy silu(g) (`gate` false).
struct SwigluBackwardRows<'a, T> {
    g: &'a [T],
    u: &'a [T],
    dy: &'a [T],
    d: &'a mut [MaybeUninit<T>],
    gate: bool,
}

impl<T: Float> Loop for SwigluBackwardRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        let rows = self.g.iter().zip(self.u).zip(self.dy);
        for (d, ((&g, &u), &dy)) in self.d.iter_mut().zip(rows) {
            let s = sigmoid(g);
            *d = MaybeUninit::new(if self.gate {
                dy * u * s * (T::one() + g * (T::one() - s))
            } else {
                dy * g * s
            });
        }
    }
}

impl Swiglu {
    pub(super) fn fwd<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
        // SAFETY: every element of each part is written.
        unsafe {
            parallel::fill(g.len(), 16384, |range, y| {
                vectorized(SwigluRows {
                    g: &g[range.clone()],
                    u: &u[range],
                    y,
                })
            })
        }
    }

    pub(super) fn bwd<T: Float>(g: &[T], u: &[T], dy: &[T], gate: bool) -> Vec<T> {
        // SAFETY: every element of each part is written.
        unsafe {
            parallel::fill(g.len(), 16384, |range, d| {
                vectorized(SwigluBackwardRows {
                    g: &g[range.clone()],
                    u: &u[range.clone()],
                    dy: &dy[range],
                    d,
                    gate,
                })
            })
        }
    }

    pub(super) fn bwd_typed<T: Float>(
        g: &Tensor,
        u: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        with_data::<T, _>(g, |gs| {
            with_data::<T, _>(u, |us| {
                with_data::<T, _>(&grad, |dy| {
                    let dg = g
                        .track_op()
                        .then(|| tensor(Self::bwd(gs, us, dy, true), g))
                        .transpose()?;
                    let du = u
                        .track_op()
                        .then(|| tensor(Self::bwd(gs, us, dy, false), u))
                        .transpose()?;
                    Ok((dg, du))
                })
            })
        })
    }
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "graft-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(s1, "graft-swiglu", T => T::to_cpu_storage_owned(
            Self::fwd::<T>(&contiguous(s1, l1)?, &contiguous(s2, l2)?)
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        for_dtype!(g.dtype(), T => Self::bwd_typed::<T>(g, u, grad))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding on `[batch, seq, heads, head_dim]`, its angles constants of the op.
// A rotation's backward is the opposite rotation, so dx needs no saved activation; candle's
// composition kept about ten intermediates per call.

pub(crate) struct Rope {
    /// `[seq, half]` each, contiguous, the input's dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `(batch, seq, heads, head_dim)`.
    pub dims: (usize, usize, usize, usize),
    pub interleaved: bool,
}

impl Rope {
    /// `x` turned by the angles (`sign` 1) or back (`sign` -1, the backward).
    pub(super) fn turn<T: Float>(&self, x: &[T], cos: &[T], sin: &[T], sign: T) -> Vec<T> {
        let (_, t, n, d) = self.dims;
        let half = cos.len() / t;
        let position_len = n * d;
        let interleaved = self.interleaved;
        // SAFETY: every element of whole positions is written (rotated pairs, then the rest).
        unsafe {
            parallel::fill(
                x.len(),
                rows_per_task(position_len) * position_len,
                |range, y| {
                    for (p, (y, x)) in y
                        .chunks_mut(position_len)
                        .zip(x[range.clone()].chunks(position_len))
                        .enumerate()
                    {
                        let position = (range.start / position_len + p) % t;
                        let c = &cos[position * half..(position + 1) * half];
                        let s = &sin[position * half..(position + 1) * half];
                        for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                            for i in 0..half {
                                let (a, b) = if interleaved {
                                    (2 * i, 2 * i + 1)
                                } else {
                                    (i, i + half)
                                };
                                let sn = sign * s[i];
                                y[a] = MaybeUninit::new(x[a] * c[i] - x[b] * sn);
                                y[b] = MaybeUninit::new(x[b] * c[i] + x[a] * sn);
                            }
                            for j in 2 * half..d {
                                y[j] = MaybeUninit::new(x[j]);
                            }
                        }
                    }
                },
            )
        }
    }

    pub(super) fn turn_tensor<T: Float>(&self, x: &[T], sign: f64) -> Result<Vec<T>> {
        with_data::<T, _>(&self.cos, |cos| {
            with_data::<T, _>(&self.sin, |sin| {
                Ok(self.turn(x, cos, sin, T::from_f64(sign)))
            })
        })
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "graft-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(storage, "graft-rope", T => T::to_cpu_storage_owned(
            self.turn_tensor::<T>(&contiguous(storage, layout)?, 1.0)?
        ));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = for_dtype!(x.dtype(), T => tensor(
            with_data::<T, _>(&grad, |dy| self.turn_tensor::<T>(dy, -1.0))?,
            x
        )?);
        Ok(Some(dx))
    }
}
