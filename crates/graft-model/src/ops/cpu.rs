//! Fused CPU kernels with hand-written backward passes, for f32 and f64.
//!
//! Half-precision tensors (bf16, f16) are storage only: a kernel reads them widened to f32,
//! computes in f32 and writes its output (and each gradient) narrowed back to the dtype of the
//! tensor it belongs to. So a bf16 model keeps half the bytes in weights and kept activations
//! while norms, softmax and products run in f32 (as autocast does), and f32 tensors (a
//! method's trainable ones) may meet bf16 ones in one kernel.
//!
//! Each replaces a chain of candle ops whose backward allocates a zeroed gradient and an
//! intermediate per edge. Every kernel is checked against its composed counterpart in
//! [`super::reference`] by value and by finite differences (`tests/kernels.rs`).
use super::blas::{Blas, Gemm};
use super::matmul::{gemm, gemm_onto, Start, Threads, View};
use super::parallel::{self, Shared, SharedMut};
use super::simd::{vectorized, Loop};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor, WithDType,
};
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// The element types the kernels are written for.
pub(crate) trait Float: num_traits::Float + WithDType + std::iter::Sum {
    fn erf(self) -> Self;
    /// `e^x`; for f32 a vectorisable approximation within 2 ulp.
    fn exp_fast(self) -> Self;
    /// The BLAS routine for this type.
    fn blas_gemm(blas: &Blas) -> Gemm<Self>;
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
}

const LANES: usize = 8;

/// `Σ f(i)` over `0..n` in eight independent partial sums, which the compiler keeps in one
/// vector register (a single running sum is a serial dependency it may not reorder).
#[inline(always)]
fn lane_sum<T: Float>(n: usize, f: impl Fn(usize) -> T) -> T {
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
fn lane_max<T: Float>(xs: &[T]) -> T {
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

/// Evaluates `$body` (a `CpuStorage` of `$T`) with `$T` the type the kernels compute in for
/// `$storage`'s dtype (f64 for f64, f32 for f32, bf16 and f16), and returns it in that dtype;
/// refuses other dtypes.
macro_rules! for_float {
    ($storage:expr, $op:literal, $T:ident => $body:expr) => {{
        let dtype = $storage.dtype();
        match dtype {
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F32 | DType::BF16 | DType::F16 => {
                type $T = f32;
                narrow_storage($body, dtype)?
            }
            _ => bail!(concat!($op, ": f32, f64, bf16 or f16 only")),
        }
    }};
}

/// Evaluates `$body` with `$T` the type the kernels compute in for `$dtype`, for backward
/// passes (whose tensors the forward pass already checked).
macro_rules! for_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F64 => {
                type $T = f64;
                $body
            }
            _ => {
                type $T = f32;
                $body
            }
        }
    };
}

mod quantized;
pub(crate) use quantized::QuantizedLinear;

/// Whether the fused kernels handle these tensors: all on the CPU, and all f64 or all of
/// f32, bf16 and f16 (computed in f32).
pub(crate) fn supports(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    let wide = first.dtype() == DType::F64;
    tensors.iter().all(|t| {
        t.device().is_cpu()
            && match t.dtype() {
                DType::F64 => wide,
                DType::F32 | DType::BF16 | DType::F16 => !wide,
                _ => false,
            }
    })
}

/// The contiguous data of `storage` as `T`: borrowed when it holds `T`, else widened (bf16
/// and f16 to f32).
fn contiguous<'a, T: Float>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<std::borrow::Cow<'a, [T]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("graft kernel: input is not contiguous")
    };
    elements(storage, start..end)
}

/// Rows `rows` of the contiguous `[_, width]` data of `storage`, as [`contiguous`] gives them.
fn contiguous_rows<'a, T: Float>(
    storage: &'a CpuStorage,
    layout: &Layout,
    width: usize,
    rows: std::ops::Range<usize>,
) -> Result<std::borrow::Cow<'a, [T]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("graft kernel: input is not contiguous")
    };
    let range = start + rows.start * width..start + rows.end * width;
    if range.end > end {
        bail!("graft kernel: rows {rows:?} of width {width} past the data's end")
    }
    elements(storage, range)
}

/// `storage[start..end]` as `T`: borrowed, or widened from bf16 or f16.
fn elements<T: Float>(
    storage: &CpuStorage,
    std::ops::Range { start, end }: std::ops::Range<usize>,
) -> Result<std::borrow::Cow<'_, [T]>> {
    fn widen<H: Copy, T: Float>(data: &[H], to_f32: impl Fn(H) -> f32) -> Vec<T> {
        data.iter()
            .map(|&h| T::from(to_f32(h)).unwrap_or_else(T::nan))
            .collect()
    }
    Ok(match storage {
        CpuStorage::BF16(data) if T::DTYPE == DType::F32 => {
            widen(&data[start..end], half::bf16::to_f32).into()
        }
        CpuStorage::F16(data) if T::DTYPE == DType::F32 => {
            widen(&data[start..end], half::f16::to_f32).into()
        }
        _ => (&T::cpu_storage_as_slice(storage)?[start..end]).into(),
    })
}

/// `data` (computed in f32 or f64) as storage of `dtype`: itself, or narrowed to bf16 or f16.
fn narrow_storage(data: CpuStorage, dtype: DType) -> Result<CpuStorage> {
    Ok(match (data, dtype) {
        (CpuStorage::F32(v), DType::BF16) => {
            CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect())
        }
        (CpuStorage::F32(v), DType::F16) => {
            CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect())
        }
        (data, dtype) if data.dtype() == dtype => data,
        (data, dtype) => bail!("graft kernel: cannot store {:?} as {dtype:?}", data.dtype()),
    })
}

fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The blocks of rows of an `[out, width]` half-precision weight that a product widens one at
/// a time, about 8 MiB of f32 each: a large weight (a tied 49k-word head) is never held widened
/// whole beside the activations.
fn widened_blocks(out: usize, width: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let block = ((2 << 20) / width.max(1)).max(1);
    (0..out)
        .step_by(block)
        .map(move |start| start..(start + block).min(out))
}

/// `x · Wᵀ (+ bias)` `[rows, out]` from `x` `[rows, in]`, with the weight `[out, in]` read a
/// block of its rows (the output's columns) at a time through `rows_of` (widened from half
/// precision, or dequantized), so that it is never held whole in `T`.
fn product_by_row_blocks<'w, T: Float>(
    x: &[T],
    (out_f, in_f): (usize, usize),
    bias: Option<&[T]>,
    rows_of: impl Fn(std::ops::Range<usize>) -> Result<std::borrow::Cow<'w, [T]>>,
) -> Result<Vec<T>> {
    let rows = x.len() / in_f.max(1);
    let mut y = vec![T::zero(); rows * out_f];
    for columns in widened_blocks(out_f, in_f) {
        let wb = rows_of(columns.clone())?;
        let start = bias.map_or(Start::Zero, |b| Start::Rows(&b[columns.clone()]));
        // SAFETY: y holds rows x out_f elements; the block writes its columns of each row.
        unsafe {
            gemm_onto(
                (rows, columns.len(), in_f),
                y.as_mut_ptr().add(columns.start),
                out_f,
                start,
                View::rows(x.as_ptr(), in_f),
                View::rows(wb.as_ptr(), in_f).t(),
                T::one(),
                Threads::Pool,
            )
        };
    }
    Ok(y)
}

/// `dy · W` `[rows, in]` from `dy` `[rows, out]`, the weight read as in
/// [`product_by_row_blocks`].
fn d_input_by_row_blocks<'w, T: Float>(
    dy: &[T],
    (out_f, in_f): (usize, usize),
    rows_of: impl Fn(std::ops::Range<usize>) -> Result<std::borrow::Cow<'w, [T]>>,
) -> Result<Vec<T>> {
    let rows = dy.len() / out_f.max(1);
    let mut dx = vec![T::zero(); rows * in_f];
    for columns in widened_blocks(out_f, in_f) {
        let wb = rows_of(columns.clone())?;
        // SAFETY: dx holds rows x in_f elements; dy's block is rows x columns, out_f apart.
        unsafe {
            gemm(
                (rows, in_f, columns.len()),
                dx.as_mut_ptr(),
                in_f,
                columns.start > 0,
                View::rows(dy.as_ptr().add(columns.start), out_f),
                View::rows(wb.as_ptr(), in_f),
                T::one(),
                Threads::Pool,
            )
        };
    }
    Ok(dx)
}

/// Runs `f` on the contiguous CPU data of `t`, as `T`.
fn with_data<T: Float, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(&contiguous(cpu, layout)?),
        _ => bail!("graft kernel: tensor is not on the CPU"),
    }
}

/// `data` as a tensor of the shape, device and dtype of `like` (narrowed if `like` is half
/// precision: a gradient has its tensor's dtype).
fn tensor<T: Float>(data: Vec<T>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(data, like.shape(), like.device())?.to_dtype(like.dtype())
}

/// The gradient `data` of `input` as a tensor, if the input is tracked (else nobody needs it).
fn gradient<T: Float>(data: Vec<T>, input: &Tensor) -> Result<Option<Tensor>> {
    input.track_op().then(|| tensor(data, input)).transpose()
}

/// Rows per parallel task: enough work per task to amortise scheduling.
fn rows_per_task(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

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
    fn row_stats<T: Float>(&self, row: &[T]) -> (T, T) {
        let n = T::from_f64(row.len() as f64);
        let mean = if self.centred {
            lane_sum(row.len(), |j| row[j]) / n
        } else {
            T::zero()
        };
        let var = lane_sum(row.len(), |j| (row[j] - mean) * (row[j] - mean)) / n;
        (mean, T::one() / (var + T::from_f64(self.eps)).sqrt())
    }

    fn fwd<T: Float>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
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
    fn fwd_rows<T: Float>(&self, x: &[T], gamma: &[T], beta: &[T], y: &mut [MaybeUninit<T>]) {
        let n = gamma.len();
        for (y, row) in y.chunks_mut(n).zip(x.chunks(n)) {
            let (mean, rstd) = self.row_stats(row);
            for j in 0..n {
                y[j] = MaybeUninit::new((row[j] - mean) * rstd * gamma[j] + beta[j]);
            }
        }
    }

    /// `(dx, dgamma, dbeta)`; the statistics are recomputed from `x` rather than stored.
    fn bwd<T: Float>(&self, x: &[T], gamma: &[T], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
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
    fn bwd_rows<T: Float>(
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

    fn bwd_typed<T: Float>(
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
    fn fwd<T: Float>(x: &[T], scale: &[T]) -> Vec<T> {
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

    fn bwd<T: Float>(x: &[T], scale: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
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

    fn bwd_typed<T: Float>(
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
    fn fwd<T: Float>(x: &[T]) -> Vec<T> {
        // SAFETY: every element of each part is written.
        unsafe {
            parallel::fill(x.len(), 16384, |range, y| {
                vectorized(GeluRows { x: &x[range], y })
            })
        }
    }

    fn bwd<T: Float>(x: &[T], dy: &[T]) -> Vec<T> {
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

    fn bwd_typed<T: Float>(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
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
    fn fwd<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
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

    fn bwd<T: Float>(g: &[T], u: &[T], dy: &[T], gate: bool) -> Vec<T> {
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

    fn bwd_typed<T: Float>(
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
    fn turn<T: Float>(&self, x: &[T], cos: &[T], sin: &[T], sign: T) -> Vec<T> {
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

    fn turn_tensor<T: Float>(&self, x: &[T], sign: f64) -> Result<Vec<T>> {
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

// ---------------------------------------------------------------------------------------------
// A projection `y = x · Wᵀ + b` whose backward computes only the gradients that are tracked: a
// frozen weight costs no weight gradient (a third of a LoRA step's FLOPs in candle's matmul).
// Frozen and trained weights run the same forward, so a model computes the same logits whether
// its weights are being trained or were reloaded (full fine-tuning's reload test).

pub(crate) struct Linear;

impl Linear {
    /// `[rows, out]` from `x` `[rows, in]`, `w` `[out, in]`, `bias` `[out]`.
    fn fwd<T: Float>(x: &[T], w: &[T], bias: Option<&[T]>, out_f: usize) -> Vec<T> {
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
    fn fwd_blocked<T: Float>(
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
    fn d_input_blocked<T: Float>(dy: &[T], w: &Tensor) -> Result<Vec<T>> {
        let (out_f, in_f) = w.dims2()?;
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            bail!("graft kernel: tensor is not on the CPU")
        };
        d_input_by_row_blocks(dy, (out_f, in_f), |rows| {
            contiguous_rows::<T>(storage, layout, in_f, rows)
        })
    }

    fn cpu_fwd_any(
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
    fn bwd_typed<T: Float>(
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

    fn bwd_any(
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

/// A frozen weight `[out, in]` as a fused kernel reads it.
pub(crate) enum FrozenWeight {
    /// Contiguous; half precision is widened a block of rows at a time.
    Dense(Tensor),
    /// Dequantized a block of rows at a time.
    Quantized(crate::quant::QuantizedWeight),
}

impl FrozenWeight {
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Quantized(q) => Ok(q.dims()),
        }
    }

    /// `x · Wᵀ + bias`, `[rows, out]`.
    fn product<T: Float>(&self, x: &[T], bias: Option<&[T]>) -> Result<Vec<T>> {
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
                quantized::dequantized_rows::<T>(q, rows)
            }),
        }
    }

    /// `dy · W`, `[rows, in]`.
    fn d_input<T: Float>(&self, dy: &[T]) -> Result<Vec<T>> {
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
            Self::Quantized(q) => d_input_by_row_blocks(dy, (out_f, in_f), |rows| {
                quantized::dequantized_rows::<T>(q, rows)
            }),
        }
    }
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

/// `[m, n]` = `a · b` (`[m, k]`, `[k, n]` views) in a new buffer.
fn product<T: Float>((m, n, k): (usize, usize, usize), a: View<T>, b: View<T>) -> Vec<T> {
    // SAFETY: the product (not accumulated) writes every element.
    unsafe {
        parallel::written(m * n, |dst| {
            gemm((m, n, k), dst, n, false, a, b, T::one(), Threads::Pool)
        })
    }
}

/// Runs `f` on the data of `t`, if there is a `t`.
fn with_optional<T: Float, R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[T]>) -> Result<R>,
) -> Result<R> {
    match t {
        Some(t) => with_data::<T, _>(t, |data| f(Some(data))),
        None => f(None),
    }
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
// ---------------------------------------------------------------------------------------------
// BERT's two blocks that end in a residual add and a layer norm, each one graph node for frozen
// tensors: the attention output `y = LN(r + x · Wᵀ + b)` over (x, r), and the feed-forward
// block `y = LN(x + GELU(x · W1ᵀ + b1) · W2ᵀ + b2)` over x. Composed, each of their candle
// nodes costs the backward a zeroed gradient and an add (the feed-forward block's two over the
// wide `[tokens, ffn]` activations); here each input receives one gradient.

/// The frozen tensors of a projection added to a residual and normalised, contiguous:
/// `weight` `[hidden, width]`, `bias`, `gamma` and `beta` `[hidden]`.
pub(crate) struct ResidualNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub norm: LayerNorm,
    pub gamma: Tensor,
    pub beta: Tensor,
}

impl ResidualNorm {
    fn width(&self) -> Result<usize> {
        Ok(self.weight.dims2()?.1)
    }

    /// `(a · Wᵀ + bias) + residual` `[rows, hidden]` for `a` `[rows, width]`, summed in the
    /// order of the composition (`ops::linear`, then the add), so that the fused blocks and the
    /// composed ones give bit-identical outputs.
    fn sum<T: Float>(&self, a: &[T], residual: &[T]) -> Result<Vec<T>> {
        let width = self.width()?;
        let mut sum = with_data::<T, _>(&self.weight, |w| {
            with_optional::<T, _>(self.bias.as_ref(), |bias| {
                Ok(Linear::fwd(a, w, bias, w.len() / width))
            })
        })?;
        let shared = SharedMut::new(&mut sum);
        parallel::for_ranges(residual.len(), 16384, |range| {
            // SAFETY: the ranges are disjoint and inside the buffer.
            let part = unsafe { shared.slice(range.clone()) };
            for (s, &r) in part.iter_mut().zip(&residual[range]) {
                *s += r;
            }
        });
        Ok(sum)
    }

    fn normalise<T: Float>(&self, sum: &[T]) -> Result<Vec<T>> {
        with_data::<T, _>(&self.gamma, |g| {
            with_data::<T, _>(&self.beta, |b| Ok(self.norm.fwd(sum, g, b)))
        })
    }

    /// The gradient of the pre-norm sum, which the residual receives as it is.
    fn d_sum<T: Float>(&self, sum: &[T], dy: &[T]) -> Result<Vec<T>> {
        with_data::<T, _>(&self.gamma, |g| Ok(self.norm.bwd(sum, g, dy).0))
    }

    /// `d_sum · W`, the gradient of the projection's input `[rows, width]`.
    fn d_input<T: Float>(&self, d_sum: &[T]) -> Result<Vec<T>> {
        let width = self.width()?;
        with_data::<T, _>(&self.weight, |w| {
            let hidden = w.len() / width;
            Ok(product(
                (d_sum.len() / hidden, width, hidden),
                View::rows(d_sum.as_ptr(), hidden),
                View::rows(w.as_ptr(), width),
            ))
        })
    }
}

/// A vector kept for the backward, as a tensor (the ops are not generic over the element type).
fn kept_tensor<T: Float>(data: Vec<T>) -> Result<Tensor> {
    let n = data.len();
    Tensor::from_vec(data, n, &candle_core::Device::Cpu)
}

pub(crate) struct ProjectionNorm {
    pub block: ResidualNorm,
    /// Keep the pre-norm sum for the backward (when a gradient will be asked for), else the
    /// backward recomputes it.
    pub keep: bool,
    pub kept: OnceLock<Tensor>,
}

impl ProjectionNorm {
    fn fwd<T: Float>(&self, x: &[T], residual: &[T]) -> Result<Vec<T>> {
        let sum = self.block.sum(x, residual)?;
        let y = self.block.normalise(&sum)?;
        if self.keep {
            let _ = self.kept.set(kept_tensor(sum)?);
        }
        Ok(y)
    }

    /// `(dx, dr)`: the norm's input gradient through the projection, and as it is.
    fn bwd_typed<T: Float>(
        &self,
        x: &Tensor,
        residual: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let sum = match self.kept.get() {
            Some(kept) => kept.clone(),
            None => kept_tensor(with_data::<T, _>(x, |xs| {
                with_data::<T, _>(residual, |rs| self.block.sum(xs, rs))
            })?)?,
        };
        let d_sum = with_data::<T, _>(&grad, |dy| {
            with_data::<T, _>(&sum, |s| self.block.d_sum(s, dy))
        })?;
        let dx = x
            .track_op()
            .then(|| tensor(self.block.d_input(&d_sum)?, x))
            .transpose()?;
        Ok((dx, gradient(d_sum, residual)?))
    }
}

impl CustomOp2 for ProjectionNorm {
    fn name(&self) -> &'static str {
        "graft-projection-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(s1, "graft-projection-norm", T => T::to_cpu_storage_owned(
            self.fwd::<T>(&contiguous(s1, l1)?, &contiguous(s2, l2)?)?
        ));
        Ok((out, l2.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        for_dtype!(x.dtype(), T => self.bwd_typed::<T>(x, residual, grad))
    }
}

pub(crate) struct FeedForwardBlock {
    /// `[ffn, hidden]` and `[ffn]`, frozen and contiguous.
    pub w_in: Tensor,
    pub b_in: Option<Tensor>,
    /// The output projection `[hidden, ffn]`, its residual (the block's input) and norm.
    pub out: ResidualNorm,
    /// Keep the pre-activation and the pre-norm sum for the backward (when a gradient will
    /// be asked for), else the backward recomputes them.
    pub keep: bool,
    pub kept: OnceLock<(Tensor, Tensor)>,
}

impl FeedForwardBlock {
    /// `(pre-activation [rows, ffn], pre-norm sum [rows, hidden])` of input `x`.
    fn pre_norm<T: Float>(&self, x: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        let ffn = self.w_in.dims2()?.0;
        let inner = with_data::<T, _>(&self.w_in, |w_in| {
            with_optional::<T, _>(self.b_in.as_ref(), |b_in| {
                Ok(Linear::fwd(x, w_in, b_in, ffn))
            })
        })?;
        let sum = self.out.sum(&GeluErf::fwd(&inner), x)?;
        Ok((inner, sum))
    }

    fn fwd<T: Float>(&self, x: &[T]) -> Result<Vec<T>> {
        let (inner, sum) = self.pre_norm(x)?;
        let y = self.out.normalise(&sum)?;
        if self.keep {
            let _ = self.kept.set((kept_tensor(inner)?, kept_tensor(sum)?));
        }
        Ok(y)
    }

    fn bwd_typed<T: Float>(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let grad = grad.contiguous()?;
        let (ffn, hidden) = self.w_in.dims2()?;
        let recomputed;
        let (inner, sum) = match self.kept.get() {
            Some(kept) => kept,
            None => {
                let (inner, sum) = with_data::<T, _>(x, |xs| self.pre_norm(xs))?;
                recomputed = (kept_tensor(inner)?, kept_tensor(sum)?);
                &recomputed
            }
        };
        // The residual passes the pre-norm sum's gradient to x as it is; the product through
        // the activation is added onto it.
        let mut dx = with_data::<T, _>(&grad, |dy| {
            with_data::<T, _>(sum, |s| self.out.d_sum(s, dy))
        })?;
        let d_inner = with_data::<T, _>(inner, |inner| {
            Ok(GeluErf::bwd(inner, &self.out.d_input(&dx)?))
        })?;
        with_data::<T, _>(&self.w_in, |w_in| {
            // SAFETY: dx holds rows x hidden elements, written by nobody else.
            unsafe {
                gemm(
                    (dx.len() / hidden, hidden, ffn),
                    dx.as_mut_ptr(),
                    hidden,
                    true,
                    View::rows(d_inner.as_ptr(), ffn),
                    View::rows(w_in.as_ptr(), hidden),
                    T::one(),
                    Threads::Pool,
                )
            };
            Ok(())
        })?;
        tensor(dx, x)
    }
}

impl CustomOp1 for FeedForwardBlock {
    fn name(&self) -> &'static str {
        "graft-feed-forward-block"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(s1, "graft-feed-forward-block", T => T::to_cpu_storage_owned(
            self.fwd::<T>(&contiguous(s1, l1)?)?
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            for_dtype!(x.dtype(), T => self.bwd_typed::<T>(x, grad)?),
        ))
    }
}
