//! Layer normalisation over the last dimension, and RMS normalisation as its uncentred case.
use super::data::*;
use crate::ops::float::{lane_sum, Float};
use crate::ops::parallel;
use crate::ops::simd::{vectorized, Loop};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use std::mem::MaybeUninit;

// ---------------------------------------------------------------------------------------------
// Layer normalisation over the last dimension, and RMS normalisation as its uncentred case.

pub(crate) struct LayerNorm {
    pub eps: f64,
    /// Subtract the mean (layer norm); without it, `x / rms(x) ⊙ gamma + beta` (RMSNorm, beta
    /// being zero).
    pub centred: bool,
}

struct NormRows<'a, T> {
    norm: &'a LayerNorm,
    x: &'a [T],
    gamma: &'a [T],
    beta: &'a [T],
    y: &'a mut [MaybeUninit<T>],
}

impl<T: Float> Loop for NormRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        self.norm.fwd_rows(self.x, self.gamma, self.beta, self.y)
    }
}

type Slices<'a, T> = (&'a [T], &'a [T], &'a [T]);

struct NormBackwardRows<'a, T> {
    norm: &'a LayerNorm,
    inputs: Slices<'a, T>,
    dx: &'a mut [MaybeUninit<T>],
    sums: (&'a mut [T], &'a mut [T]),
}

impl<T: Float> Loop for NormBackwardRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        self.norm.bwd_rows(self.inputs, self.dx, self.sums)
    }
}

impl LayerNorm {
    #[inline(always)]
    pub(super) fn row_stats<T: Float>(&self, row: &[T]) -> (T, T) {
        let n = T::from_f64(row.len() as f64);
        let mean = if self.centred {
            lane_sum(row.len(), |j| row[j]) / n
        } else {
            T::zero()
        };
        let var = lane_sum(row.len(), |j| (row[j] - mean) * (row[j] - mean)) / n;
        (mean, T::one() / (var + T::from_f64(self.eps)).sqrt())
    }

    pub(super) fn fwd<T: Float>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let n = gamma.len();
        // SAFETY: fwd_rows writes every element of whole rows.
        unsafe {
            parallel::fill(x.len(), rows_per_task(n) * n, |range, y| {
                vectorized(NormRows {
                    norm: self,
                    x: &x[range],
                    gamma,
                    beta,
                    y,
                })
            })
        }
    }

    #[inline(always)]
    pub(super) fn fwd_rows<T: Float>(
        &self,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        y: &mut [MaybeUninit<T>],
    ) {
        let n = gamma.len();
        for (y, row) in y.chunks_mut(n).zip(x.chunks(n)) {
            let (mean, rstd) = self.row_stats(row);
            for j in 0..n {
                y[j] = MaybeUninit::new((row[j] - mean) * rstd * gamma[j] + beta[j]);
            }
        }
    }

    /// `(dx, dgamma, dbeta)`; the statistics are recomputed from `x` rather than stored.
    pub(super) fn bwd<T: Float>(&self, x: &[T], gamma: &[T], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let n = gamma.len();
        let part = |range: std::ops::Range<usize>, dx: &mut [MaybeUninit<T>], sums: &mut [T]| {
            vectorized(NormBackwardRows {
                norm: self,
                inputs: (&x[range.clone()], gamma, &dy[range]),
                dx,
                sums: sums.split_at_mut(n),
            })
        };
        // SAFETY: bwd_rows writes dx for every element of whole rows.
        let (dx, mut sums) =
            unsafe { parallel::fill_summing(x.len(), rows_per_task(n) * n, 2 * n, part) };
        let dbeta = sums.split_off(n);
        let dgamma = sums;
        (dx, dgamma, dbeta)
    }

    /// dx of whole rows, and their dgamma and dbeta added into the given sums.
    #[inline(always)]
    pub(super) fn bwd_rows<T: Float>(
        &self,
        (x, gamma, dy): (&[T], &[T], &[T]),
        dx: &mut [MaybeUninit<T>],
        (dgamma, dbeta): (&mut [T], &mut [T]),
    ) {
        let n = gamma.len();
        let inv_n = T::one() / T::from_f64(n as f64);
        for ((dx, x), dy) in dx.chunks_mut(n).zip(x.chunks(n)).zip(dy.chunks(n)) {
            let (mean, rstd) = self.row_stats(x);
            let xhat = |j: usize| (x[j] - mean) * rstd;
            let mean_g = if self.centred {
                lane_sum(n, |j| dy[j] * gamma[j]) * inv_n
            } else {
                T::zero()
            };
            let mean_gx = lane_sum(n, |j| dy[j] * gamma[j] * xhat(j)) * inv_n;
            for j in 0..n {
                dgamma[j] += dy[j] * xhat(j);
                dbeta[j] += dy[j];
            }
            for j in 0..n {
                dx[j] = MaybeUninit::new(rstd * (dy[j] * gamma[j] - mean_g - xhat(j) * mean_gx));
            }
        }
    }

    pub(super) fn bwd_typed<T: Float>(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dgamma, dbeta) = with_data::<T, _>(x, |xs| {
            with_data::<T, _>(gamma, |g| {
                with_data::<T, _>(&grad, |dy| Ok(self.bwd(xs, g, dy)))
            })
        })?;
        Ok((
            Some(tensor(dx, x)?),
            gradient(dgamma, gamma)?,
            gradient(dbeta, beta)?,
        ))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "graft-layer-norm"
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
        let out = for_float!(s1, "graft-layer-norm", T => T::to_cpu_storage_owned(
            self.fwd::<T>(&contiguous(s1, l1)?, &contiguous(s2, l2)?, &contiguous(s3, l3)?)
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        for_dtype!(x.dtype(), T => self.bwd_typed::<T>(x, gamma, beta, grad))
    }
}
