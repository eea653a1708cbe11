//! What every kernel shares: reading tensor storage as the type it computes in (widening half
//! precision), writing results back, and the dtype dispatch macros.
use crate::ops::float::Float;
use crate::ops::matmul::{gemm, gemm_onto, Start, Threads, View};
use crate::ops::parallel;
use crate::quant::QuantizedWeight;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Evaluates `$body` (a `CpuStorage` of `$T`) with `$T` the type the kernels compute in for
/// `$storage`'s dtype (f64 for f64, f32 for f32, bf16 and f16), and returns it in that dtype;
/// refuses other dtypes.
macro_rules! for_float {
    ($storage:expr, $op:literal, $T:ident => $body:expr) => {{
        let dtype = $storage.dtype();
        match dtype {
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16 => {
                type $T = f32;
                $crate::ops::cpu::data::narrow_storage($body, dtype)?
            }
            _ => candle_core::bail!(concat!($op, ": f32, f64, bf16 or f16 only")),
        }
    }};
}

/// Evaluates `$body` with `$T` the type the kernels compute in for `$dtype`, for backward
/// passes (whose tensors the forward pass already checked).
macro_rules! for_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F64 => {
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
pub(super) fn contiguous<'a, T: Float>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<std::borrow::Cow<'a, [T]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("graft kernel: input is not contiguous")
    };
    elements(storage, start..end)
}

/// Rows `rows` of the contiguous `[_, width]` data of `storage`, as [`contiguous`] gives them.
pub(super) fn contiguous_rows<'a, T: Float>(
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
pub(super) fn elements<T: Float>(
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
pub(super) fn narrow_storage(data: CpuStorage, dtype: DType) -> Result<CpuStorage> {
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

pub(super) fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The blocks of rows of an `[out, width]` half-precision weight that a product widens one at
/// a time, about 8 MiB of f32 each: a large weight (a tied 49k-word head) is never held widened
/// whole beside the activations.
pub(super) fn widened_blocks(
    out: usize,
    width: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let block = ((2 << 20) / width.max(1)).max(1);
    (0..out)
        .step_by(block)
        .map(move |start| start..(start + block).min(out))
}

/// `x · Wᵀ (+ bias)` `[rows, out]` from `x` `[rows, in]`, with the weight `[out, in]` read a
/// block of its rows (the output's columns) at a time through `rows_of` (widened from half
/// precision, or dequantized), so that it is never held whole in `T`.
pub(super) fn product_by_row_blocks<'w, T: Float>(
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
pub(super) fn d_input_by_row_blocks<'w, T: Float>(
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
pub(super) fn with_data<T: Float, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(&contiguous(cpu, layout)?),
        _ => bail!("graft kernel: tensor is not on the CPU"),
    }
}

/// `data` as a tensor of the shape, device and dtype of `like` (narrowed if `like` is half
/// precision: a gradient has its tensor's dtype).
pub(super) fn tensor<T: Float>(data: Vec<T>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(data, like.shape(), like.device())?.to_dtype(like.dtype())
}

/// The gradient `data` of `input` as a tensor, if the input is tracked (else nobody needs it).
pub(super) fn gradient<T: Float>(data: Vec<T>, input: &Tensor) -> Result<Option<Tensor>> {
    input.track_op().then(|| tensor(data, input)).transpose()
}

/// `[m, n]` = `a · b` (`[m, k]`, `[k, n]` views) in a new buffer.
pub(super) fn product<T: Float>(
    (m, n, k): (usize, usize, usize),
    a: View<T>,
    b: View<T>,
) -> Vec<T> {
    // SAFETY: the product (not accumulated) writes every element.
    unsafe {
        parallel::written(m * n, |dst| {
            gemm((m, n, k), dst, n, false, a, b, T::one(), Threads::Pool)
        })
    }
}

/// Rows per parallel task: enough work per task to amortise scheduling.
pub(super) fn rows_per_task(width: usize) -> usize {
    (16384 / width.max(1)).max(1)
}

/// Runs `f` on the data of `t`, if there is a `t`.
pub(super) fn with_optional<T: Float, R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[T]>) -> Result<R>,
) -> Result<R> {
    match t {
        Some(t) => with_data::<T, _>(t, |data| f(Some(data))),
        None => f(None),
    }
}

/// Rows `rows` of `weight` dequantized, as `T`, the rows split over the pool's threads.
pub(super) fn dequantized_rows<T: Float>(
    weight: &QuantizedWeight,
    rows: std::ops::Range<usize>,
) -> Result<std::borrow::Cow<'static, [T]>> {
    let width = weight.dims().1;
    let mut out = vec![T::zero(); rows.len() * width];
    let shared = parallel::SharedMut::new(&mut out);
    let failure = std::sync::Mutex::new(None);
    parallel::for_ranges(rows.len(), (1 << 16) / width.max(1), |part| {
        let first = rows.start + part.start;
        match weight.rows_f32(first..first + part.len()) {
            // SAFETY: each task writes its own rows of `out`.
            Ok(values) => unsafe { shared.slice(part.start * width..part.end * width) }
                .iter_mut()
                .zip(values)
                .for_each(|(o, v)| *o = T::from(v).unwrap_or_else(T::nan)),
            Err(e) => *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(std::borrow::Cow::Owned(out)),
    }
}

pub(super) use {for_dtype, for_float};
