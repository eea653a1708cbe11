//! Scaled dot-product attention over `[batch, seq, heads * head_dim]` activations.
use super::data::*;
use crate::ops::float::{lane_max, lane_sum, Float};
use crate::ops::matmul::{gemm, Threads, View};
use crate::ops::parallel::{self, Shared, SharedMut};
use crate::ops::simd::{vectorized, Loop};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// Scaled dot-product attention over `[batch, seq, heads * head_dim]` activations.

/// The sizes and options of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionDims {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f64,
    /// Elements from one row of the query input to the next, and of the key and value inputs:
    /// their widths, or the packed row's when q, k and v are column blocks of one tensor.
    pub q_stride: usize,
    pub kv_stride: usize,
}

impl AttentionDims {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Rows `[queries, keys]` of scores turned into probabilities in place: the key bias added,
/// keys beyond a causal query's position given probability 0.
struct SoftmaxRows<'a, T> {
    scores: &'a mut [T],
    keys: usize,
    queries: usize,
    causal: bool,
    bias: Option<&'a [T]>,
}

impl<T: Float> Loop for SoftmaxRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        let (tk, tq) = (self.keys, self.queries);
        for (i, row) in self.scores.chunks_mut(tk).enumerate() {
            // A causal query sees the keys up to its own position, offset by any prefix keys.
            let visible = if self.causal {
                (i + 1 + tk - tq).min(tk)
            } else {
                tk
            };
            if let Some(bias) = self.bias {
                for (s, &m) in row[..visible].iter_mut().zip(bias) {
                    *s += m;
                }
            }
            let max = lane_max(&row[..visible]);
            for s in &mut row[..visible] {
                *s = (*s - max).exp_fast();
            }
            let inv = T::one() / lane_sum(visible, |j| row[j]);
            for s in &mut row[..visible] {
                *s *= inv;
            }
            for s in &mut row[visible..] {
                *s = T::zero();
            }
        }
    }
}

/// The softmax's backward in place over rows of `grads` (dP into dS):
/// dS = P ∘ (dP − Σ_j P∘dP); masked probabilities are 0 and stay so.
struct SoftmaxBackwardRows<'a, T> {
    probs: &'a [T],
    grads: &'a mut [T],
    keys: usize,
}

impl<T: Float> Loop for SoftmaxBackwardRows<'_, T> {
    #[inline(always)]
    fn run(self) {
        let tk = self.keys;
        for (p, dp) in self.probs.chunks(tk).zip(self.grads.chunks_mut(tk)) {
            let dot = lane_sum(tk, |j| p[j] * dp[j]);
            for (g, &p) in dp.iter_mut().zip(p) {
                *g = p * (*g - dot);
            }
        }
    }
}

/// Attention whose backward reuses the forward's probabilities when they were kept, else
/// recomputes them, so memory stays linear in the sequence length for long sequences.
pub(crate) struct Attention {
    pub dims: AttentionDims,
    /// Additive key bias `[batch, keys]` (0 or a large negative number), if any.
    pub key_bias: Option<Tensor>,
    /// Keep the forward's probabilities for the backward rather than recompute them (when a
    /// gradient will be asked for and they are small enough).
    pub keep_probs: bool,
    /// The kept probabilities, `[batch * heads * queries * keys]`.
    pub kept: OnceLock<Tensor>,
    /// The dtype they are kept in: the activations' (bf16 halves them).
    pub kept_dtype: DType,
}

impl Attention {
    /// Probabilities `[queries, keys]` of head `head` of row `b`, into `probs`.
    fn probabilities<T: Float>(
        &self,
        (q, k): (Shared<T>, Shared<T>),
        bias: Option<&[T]>,
        (b, head): (usize, usize),
        probs: &mut [T],
    ) {
        let d = self.dims;
        let (tq, tk) = (d.queries, d.keys);
        let kv_head = head / d.group();
        let q_view = View::rows(q.at(b * tq * d.q_stride + head * d.head_dim), d.q_stride);
        let k_view = View::rows(
            k.at(b * tk * d.kv_stride + kv_head * d.head_dim),
            d.kv_stride,
        );
        unsafe {
            gemm(
                (tq, tk, d.head_dim),
                probs.as_mut_ptr(),
                tk,
                false,
                q_view,
                k_view.t(),
                T::from_f64(d.scale),
                Threads::Caller,
            );
        }
        let bias = bias.map(|bias| &bias[b * tk..(b + 1) * tk]);
        vectorized(SoftmaxRows {
            scores: probs,
            keys: tk,
            queries: tq,
            causal: d.causal,
            bias,
        });
    }

    fn fwd<T: Float>(&self, q: &[T], k: &[T], v: &[T], bias: Option<&[T]>) -> Vec<T> {
        let d = self.dims;
        let (tq, tk) = (d.queries, d.keys);
        let mut out = Vec::with_capacity(d.batch * tq * d.q_width());
        let out_ptr = SharedMut(out.spare_capacity_mut().as_mut_ptr().cast::<T>());
        let (qp, kp, vp) = (Shared(q.as_ptr()), Shared(k.as_ptr()), Shared(v.as_ptr()));
        let block = tq * tk;
        // Not zeroed first: every task writes its whole block (6 MiB a MiniLM layer).
        let kept_len = if self.keep_probs {
            d.batch * d.heads * block
        } else {
            0
        };
        let mut kept: Vec<T> = Vec::with_capacity(kept_len);
        let kept_ptr = SharedMut(kept.as_mut_ptr());
        parallel::for_ranges(d.batch * d.heads, 1, |tasks| {
            let mut scratch = vec![T::zero(); if self.keep_probs { 0 } else { block }];
            for task in tasks {
                let (b, head) = (task / d.heads, task % d.heads);
                let probs = if self.keep_probs {
                    // SAFETY: each task owns its block of the kept probabilities.
                    unsafe { kept_ptr.slice(task * block..(task + 1) * block) }
                } else {
                    &mut scratch[..]
                };
                self.probabilities((qp, kp), bias, (b, head), probs);
                let kv_head = head / d.group();
                let v_view = View::rows(
                    vp.at(b * tk * d.kv_stride + kv_head * d.head_dim),
                    d.kv_stride,
                );
                // Each task writes its own head's columns of its own row: disjoint blocks.
                unsafe {
                    gemm(
                        (tq, d.head_dim, tk),
                        out_ptr.at(b * tq * d.q_width() + head * d.head_dim),
                        d.q_width(),
                        false,
                        View::rows(probs.as_ptr(), tk),
                        v_view,
                        T::one(),
                        Threads::Caller,
                    );
                }
            }
        });
        // SAFETY: every (row, head) block was written by its task's product (not accumulated),
        // and its probabilities (if kept) by its softmax.
        unsafe {
            out.set_len(d.batch * tq * d.q_width());
            kept.set_len(kept_len);
        }
        if self.keep_probs {
            let len = kept.len();
            let kept = Tensor::from_vec(kept, len, &candle_core::Device::Cpu)
                .and_then(|k| k.to_dtype(self.kept_dtype));
            if let Ok(kept) = kept {
                let _ = self.kept.set(kept);
            }
        }
        out
    }

    /// dq, dk and dv into the buffers given (every element written: not zeroed first), laid
    /// out as q, k and v. One task per key/value head of a row, so that the heads sharing it
    /// (grouped-query attention) accumulate into its gradient without contention.
    fn bwd<T: Float>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        bias: Option<&[T]>,
        kept: Option<&[T]>,
        dout: &[T],
        (dqp, dkp, dvp): (SharedMut<T>, SharedMut<T>, SharedMut<T>),
    ) {
        let d = self.dims;
        let (tq, tk, hd) = (d.queries, d.keys, d.head_dim);
        let (qp, kp, vp, dop) = (
            Shared(q.as_ptr()),
            Shared(k.as_ptr()),
            Shared(v.as_ptr()),
            Shared(dout.as_ptr()),
        );
        let scale = T::from_f64(d.scale);
        parallel::for_ranges(d.batch * d.kv_heads, 1, |tasks| {
            let block = tq * tk;
            let mut scratch = vec![T::zero(); if kept.is_some() { 0 } else { block }];
            let mut dprobs = vec![T::zero(); block];
            let dprobs = &mut dprobs;
            for task in tasks {
                let (b, kv_head) = (task / d.kv_heads, task % d.kv_heads);
                let kv_offset = b * tk * d.kv_stride + kv_head * hd;
                let k_view = View::rows(kp.at(kv_offset), d.kv_stride);
                let v_view = View::rows(vp.at(kv_offset), d.kv_stride);
                for head in kv_head * d.group()..(kv_head + 1) * d.group() {
                    // The group's first head writes dK and dV, the others add to them.
                    let first = head == kv_head * d.group();
                    let q_offset = b * tq * d.q_stride + head * hd;
                    let q_view = View::rows(qp.at(q_offset), d.q_stride);
                    // The output (and its gradient) is never packed.
                    let do_view = View::rows(dop.at(b * tq * d.q_width() + head * hd), d.q_width());
                    let probs: &[T] = match kept {
                        Some(all) => &all[(b * d.heads + head) * block..][..block],
                        None => {
                            self.probabilities((qp, kp), bias, (b, head), &mut scratch);
                            &scratch
                        }
                    };
                    unsafe {
                        // dV += Pᵀ · dO
                        gemm(
                            (tk, hd, tq),
                            dvp.at(kv_offset),
                            d.kv_stride,
                            !first,
                            View::rows(probs.as_ptr(), tk).t(),
                            do_view,
                            T::one(),
                            Threads::Caller,
                        );
                        // dP = dO · Vᵀ
                        gemm(
                            (tq, tk, hd),
                            dprobs.as_mut_ptr(),
                            tk,
                            false,
                            do_view,
                            v_view.t(),
                            T::one(),
                            Threads::Caller,
                        );
                    }
                    // dS = P ∘ (dP − Σ_j P∘dP), the softmax's backward (masked P is 0).
                    vectorized(SoftmaxBackwardRows {
                        probs,
                        grads: dprobs,
                        keys: tk,
                    });
                    unsafe {
                        // dQ = scale · dS · K
                        gemm(
                            (tq, hd, tk),
                            dqp.at(q_offset),
                            d.q_stride,
                            false,
                            View::rows(dprobs.as_ptr(), tk),
                            k_view,
                            scale,
                            Threads::Caller,
                        );
                        // dK += scale · dSᵀ · Q
                        gemm(
                            (tk, hd, tq),
                            dkp.at(kv_offset),
                            d.kv_stride,
                            !first,
                            View::rows(dprobs.as_ptr(), tk).t(),
                            q_view,
                            scale,
                            Threads::Caller,
                        );
                    }
                }
            }
        });
    }

    fn with_bias<T: Float, R>(&self, f: impl FnOnce(Option<&[T]>) -> Result<R>) -> Result<R> {
        match &self.key_bias {
            Some(bias) => with_data::<T, _>(bias, |b| f(Some(b))),
            None => f(None),
        }
    }

    fn cpu_fwd_typed<T: Float>(&self, q: &[T], k: &[T], v: &[T]) -> Result<CpuStorage> {
        self.with_bias::<T, _>(|bias| Ok(T::to_cpu_storage_owned(self.fwd(q, k, v, bias))))
    }

    /// The gradients into the buffers `out`, each element written (see [`Attention::bwd`]),
    /// with the probabilities kept by the forward if there are any.
    fn grads_into<T: Float>(
        &self,
        inputs: (&[T], &[T], &[T]),
        grad: &Tensor,
        out: (SharedMut<T>, SharedMut<T>, SharedMut<T>),
    ) -> Result<()> {
        let grad = grad.contiguous()?;
        with_data::<T, _>(&grad, |dout| {
            self.with_bias::<T, _>(|bias| match self.kept.get() {
                Some(kept) => with_data::<T, _>(kept, |p| {
                    self.bwd(inputs, bias, Some(p), dout, out);
                    Ok(())
                }),
                None => {
                    self.bwd(inputs, bias, None, dout, out);
                    Ok(())
                }
            })
        })
    }

    fn bwd_typed<T: Float>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut dq: Vec<T> = Vec::with_capacity(q.elem_count());
        let mut dk: Vec<T> = Vec::with_capacity(k.elem_count());
        let mut dv: Vec<T> = Vec::with_capacity(v.elem_count());
        let out = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        with_data::<T, _>(q, |qs| {
            with_data::<T, _>(k, |ks| {
                with_data::<T, _>(v, |vs| self.grads_into((qs, ks, vs), grad, out))
            })
        })?;
        // SAFETY: the backward wrote every element of the three.
        unsafe {
            dq.set_len(q.elem_count());
            dk.set_len(k.elem_count());
            dv.set_len(v.elem_count());
        }
        Ok((
            Some(tensor(dq, q)?),
            Some(tensor(dk, k)?),
            Some(tensor(dv, v)?),
        ))
    }

    /// Where k and v start in a packed row (q, k, v as column blocks of one tensor).
    fn packed_offsets(&self) -> (usize, usize) {
        let d = self.dims;
        (d.q_width(), d.q_width() + d.kv_width())
    }

    fn bwd_packed_typed<T: Float>(&self, qkv: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (k_at, v_at) = self.packed_offsets();
        let mut dqkv: Vec<T> = Vec::with_capacity(qkv.elem_count());
        let base = dqkv.as_mut_ptr();
        // SAFETY: the offsets are inside the buffer (a packed row is wider than both).
        let out = unsafe {
            (
                SharedMut(base),
                SharedMut(base.add(k_at)),
                SharedMut(base.add(v_at)),
            )
        };
        with_data::<T, _>(qkv, |all| {
            self.grads_into((all, &all[k_at..], &all[v_at..]), grad, out)
        })?;
        // SAFETY: the backward wrote every element: dq, dk and dv are the row's three blocks.
        unsafe { dqkv.set_len(qkv.elem_count()) };
        tensor(dqkv, qkv)
    }
}

/// Packed: q, k and v as the column blocks of one `[batch, seq, q + 2 kv]` input.
impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "graft-attention-packed"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (k_at, v_at) = self.packed_offsets();
        let out = for_float!(s1, "graft-attention-packed", T => {
            let all = contiguous::<T>(s1, l1)?;
            self.cpu_fwd_typed::<T>(&all, &all[k_at..], &all[v_at..])?
        });
        let d = self.dims;
        Ok((out, Shape::from((d.batch, d.queries, d.q_width()))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            for_dtype!(qkv.dtype(), T => self.bwd_packed_typed::<T>(qkv, grad)?),
        ))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "graft-attention"
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
        let out = for_float!(s1, "graft-attention", T => self.cpu_fwd_typed::<T>(
            &contiguous(s1, l1)?,
            &contiguous(s2, l2)?,
            &contiguous(s3, l3)?,
        )?);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        for_dtype!(q.dtype(), T => self.bwd_typed::<T>((q, k, v), grad))
    }
}
