//! Projections: dense, quantized, and with low-rank updates.
use super::dispatch::{fused, input};
use super::{cpu, reference};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// `x · Wᵀ + b` (`weight` `[out, in]`, `x` `[..., in]`). Gradients reach whichever of `x`,
/// `weight` and `bias` are tracked, and only those are computed: a frozen weight costs no
/// weight gradient, where candle's matmul backward always computes one (about a third of a LoRA
/// step, and a model-sized set of buffers).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (x, weight) = (&input(x), &input(weight));
    let bias = bias.map(input);
    let bias = bias.as_ref();
    let mut all = vec![x, weight];
    all.extend(bias);
    if fused(&all) {
        let x = x.contiguous()?;
        let weight = weight.contiguous()?;
        return match bias {
            Some(b) => x.apply_op3_arc(
                &weight,
                &b.contiguous()?,
                std::sync::Arc::new(Box::new(cpu::Linear)),
            ),
            None => x.apply_op2_arc(&weight, std::sync::Arc::new(Box::new(cpu::Linear))),
        };
    }
    if weight.track_op() || bias.is_some_and(Tensor::track_op) {
        return reference::linear(x, weight, bias);
    }
    let output = reference::linear(&x.detach(), weight, bias)?;
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(FrozenLinearGrad {
        weight: FrozenWeight::Dense(weight.clone()),
        output,
    })
}

/// `x · Wᵀ` through a frozen weight kept quantized (`x` `[..., in]`, W `[out, in]`), with the
/// input gradient `dy · W`. On the CPU one fused node dequantizes W a block of rows at a time,
/// forward and backward, and computes in the activations' precision; elsewhere (and under
/// `GRAFT_REFERENCE_OPS`) W is dequantized whole (one weight at a time, not kept) for the
/// forward product and again for the backward's, in the activations' precision. Both
/// directions thus use the same dequantized W, so the gradients are those of the function the
/// forward computed (candle's quantized product would also quantize the activations, forward
/// only).
pub fn quantized_linear(x: &Tensor, weight: &crate::quant::QuantizedWeight) -> Result<Tensor> {
    let x = &input(x);
    let (out_f, in_f) = weight.dims();
    if x.dims().last() != Some(&in_f) {
        candle_core::bail!(
            "quantized linear: input {:?} does not fit a weight of [{out_f}, {in_f}]",
            x.dims()
        );
    }
    if fused(&[x]) && weight.device().is_cpu() {
        let op = cpu::QuantizedLinear {
            weight: weight.clone(),
            transposed: false,
        };
        return x
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(op)));
    }
    let output = {
        let dense = weight.dequantize()?.to_dtype(x.dtype())?;
        reference::linear(&x.detach(), &dense, None)?.contiguous()?
    };
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(FrozenLinearGrad {
        weight: FrozenWeight::Quantized(weight.clone()),
        output,
    })
}

/// `x · Wᵀ + bias` through a frozen quantized weight plus a low-rank update `(x ⊙ mask) · aᵀ ·
/// bᵀ` (LoRA on a quantized base, as QLoRA trains). On the CPU, with a frozen bias, one fused
/// node: the update is accumulated into the product and the input's gradient passes through
/// the dequantizing kernel, and the graph keeps neither the product nor the update apart.
/// Elsewhere the sum of [`quantized_linear`], the bias and [`low_rank_delta`].
pub fn quantized_linear_low_rank(
    x: &Tensor,
    weight: &crate::quant::QuantizedWeight,
    bias: Option<&Tensor>,
    update: &crate::LowRank,
) -> Result<Tensor> {
    let (out_f, in_f) = weight.dims();
    let (rank, in_a) = update.a.dims2()?;
    if in_a != in_f || update.b.dims() != [out_f, rank] {
        candle_core::bail!(
            "low-rank update of shapes a {:?}, b {:?} does not fit a weight of [{out_f}, {in_f}]",
            update.a.dims(),
            update.b.dims()
        )
    }
    let x = &input(x);
    let bias = bias.map(input);
    let (a, b) = (input(&update.a), input(&update.b));
    let mask = update.input_mask.as_ref().map(input);
    let mut all = vec![x, &a, &b];
    all.extend(bias.as_ref());
    all.extend(mask.as_ref());
    let fits = mask.as_ref().is_none_or(|m| m.dims() == x.dims())
        && !bias.as_ref().is_some_and(Tensor::track_op);
    if !(fits && fused(&all) && weight.device().is_cpu()) {
        let product = quantized_linear(x, weight)?;
        let base = match &bias {
            Some(b) => product.broadcast_add(b)?,
            None => product,
        };
        return base + low_rank_delta(x, update)?;
    }
    let op = cpu::LowRankLinear {
        weight: cpu::FrozenWeight::Quantized(weight.clone()),
        bias: bias.as_ref().map(Tensor::contiguous).transpose()?,
        mask: mask.as_ref().map(Tensor::contiguous).transpose()?,
        blocks: vec![cpu::UpdateBlock {
            columns: 0..out_f,
            ranks: 0..rank,
            b_offset: 0,
        }],
    };
    x.contiguous()?.apply_op3_arc(
        &a.contiguous()?,
        &b.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// `x · Wᵀ + bias` plus a low-rank update `(x ⊙ mask) · aᵀ · bᵀ` (LoRA, AdaLoRA). With a
/// frozen weight and bias on the CPU this is one fused node (see `cpu::LowRankLinear`);
/// otherwise the sum of [`linear`] and [`low_rank_delta`].
pub fn linear_low_rank(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    update: &crate::LowRank,
) -> Result<Tensor> {
    let out = weight.dims2()?.0;
    linear_low_ranks(x, weight, bias, &[(0..out, update)])
}

/// `x · Wᵀ + bias` with low-rank updates of blocks of its output columns: `(columns, update)`
/// adds `(x ⊙ mask) · aᵀ · bᵀ` to those columns (query, key and value projected as one
/// product, each with its own update). One fused node when the weight and bias are frozen, on
/// the CPU, and at most a single update has a dropout mask; else the composition.
pub fn linear_low_ranks(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    updates: &[(std::ops::Range<usize>, &crate::LowRank)],
) -> Result<Tensor> {
    let (out_w, in_w) = weight.dims2()?;
    for (columns, update) in updates {
        let (rank, in_a) = update.a.dims2()?;
        let (out_b, rank_b) = update.b.dims2()?;
        if in_a != in_w || out_b != columns.len() || columns.end > out_w || rank_b != rank {
            candle_core::bail!(
                "low-rank update of shapes a {:?}, b {:?} does not fit columns {columns:?} of a weight of {:?}",
                update.a.dims(),
                update.b.dims(),
                weight.dims()
            )
        }
    }
    let mut columns: Vec<_> = updates.iter().map(|(c, _)| c.clone()).collect();
    columns.sort_by_key(|c| c.start);
    if columns.windows(2).any(|w| w[0].end > w[1].start) {
        candle_core::bail!("low-rank updates of overlapping columns {columns:?}")
    }
    let (x, weight) = (&input(x), &input(weight));
    let bias = bias.map(input);
    let parts: Vec<(Tensor, Tensor, Option<Tensor>)> = updates
        .iter()
        .map(|(_, u)| (input(&u.a), input(&u.b), u.input_mask.as_ref().map(input)))
        .collect();
    let masks: Vec<&Tensor> = parts.iter().filter_map(|(_, _, m)| m.as_ref()).collect();
    let mut all = vec![x, weight];
    all.extend(bias.as_ref());
    all.extend(parts.iter().flat_map(|(a, b, _)| [a, b]));
    all.extend(masks.iter().copied());
    let frozen = !weight.track_op() && !bias.as_ref().is_some_and(Tensor::track_op);
    let masks_fit = match masks.as_slice() {
        [] => true,
        [mask] => updates.len() == 1 && mask.dims() == x.dims(),
        _ => false,
    };
    if updates.is_empty() || !(fused(&all) && frozen && masks_fit) {
        let base = linear(x, weight, bias.as_ref())?;
        return add_low_ranks(x, base, updates);
    }
    // A single update passes its own factors; several are stacked (A by rows, B flattened).
    let (a, b) = match parts.as_slice() {
        [(a, b, _)] => (a.contiguous()?, b.contiguous()?),
        _ => (
            Tensor::cat(&parts.iter().map(|(a, _, _)| a).collect::<Vec<_>>(), 0)?,
            Tensor::cat(
                &parts
                    .iter()
                    .map(|(_, b, _)| b.flatten_all())
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?,
        ),
    };
    let mut blocks = Vec::with_capacity(updates.len());
    let (mut rank, mut b_offset) = (0, 0);
    for (columns, update) in updates {
        let r = update.a.dims()[0];
        blocks.push(cpu::UpdateBlock {
            columns: columns.clone(),
            ranks: rank..rank + r,
            b_offset,
        });
        rank += r;
        b_offset += columns.len() * r;
    }
    let op = cpu::LowRankLinear {
        weight: cpu::FrozenWeight::Dense(weight.contiguous()?),
        bias: bias.as_ref().map(Tensor::contiguous).transpose()?,
        mask: masks.first().map(|m| m.contiguous()).transpose()?,
        blocks,
    };
    x.contiguous()?
        .apply_op3_arc(&a, &b, std::sync::Arc::new(Box::new(op)))
}

/// `base` with each update's delta added to its columns, composed of candle ops.
fn add_low_ranks(
    x: &Tensor,
    base: Tensor,
    updates: &[(std::ops::Range<usize>, &crate::LowRank)],
) -> Result<Tensor> {
    let out = base.dims().last().copied().unwrap_or(0);
    match updates {
        [] => Ok(base),
        [(columns, update)] if *columns == (0..out) => base + low_rank_delta(x, update)?,
        _ => {
            let last = base.rank() - 1;
            let mut pieces = Vec::new();
            let mut at = 0;
            let mut sorted: Vec<_> = updates.iter().collect();
            sorted.sort_by_key(|(columns, _)| columns.start);
            for (columns, update) in sorted {
                if columns.start > at {
                    pieces.push(base.narrow(last, at, columns.start - at)?);
                }
                let part = base.narrow(last, columns.start, columns.len())?;
                pieces.push((part + low_rank_delta(x, update)?)?);
                at = columns.end;
            }
            if at < out {
                pieces.push(base.narrow(last, at, out - at)?);
            }
            Tensor::cat(&pieces, last)
        }
    }
}

/// The low-rank update alone, `(x ⊙ mask) · aᵀ · bᵀ`.
pub fn low_rank_delta(x: &Tensor, update: &crate::LowRank) -> Result<Tensor> {
    let x = match &update.input_mask {
        Some(mask) => x.broadcast_mul(mask)?,
        None => x.clone(),
    };
    linear(&linear(&x, &update.a, None)?, &update.b, None)
}

/// The frozen projection off the CPU: the product is computed outside the graph and this op
/// carries only the input gradient.
struct FrozenLinearGrad {
    weight: FrozenWeight,
    output: Tensor,
}

enum FrozenWeight {
    Dense(Tensor),
    /// Dequantized whole for each backward (one layer's weight at a time).
    Quantized(crate::quant::QuantizedWeight),
}

impl CustomOp1 for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _input: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.output.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) if layout.is_contiguous() && layout.start_offset() == 0 => {
                Ok((cpu.clone(), layout.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: output is not a contiguous CPU tensor"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _input: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (storage, layout) = self.output.storage_and_layout();
        match &*storage {
            Storage::Cuda(cuda) => Ok((cuda.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("frozen-linear: output is not a CUDA tensor"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dequantized;
        let weight = match &self.weight {
            FrozenWeight::Dense(w) => w,
            FrozenWeight::Quantized(q) => {
                dequantized = q.dequantize()?.to_dtype(grad_res.dtype())?;
                &dequantized
            }
        };
        let grad_x = match grad_res.dims() {
            [b, s, o] => grad_res
                .reshape((b * s, *o))?
                .matmul(weight)?
                .reshape((*b, *s, ()))?,
            _ => grad_res.broadcast_matmul(weight)?,
        };
        Ok(Some(grad_x.to_dtype(arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::dispatch::{grad_enabled, without_grad};
    use candle_core::{DType, Device, Var};

    /// Without gradients the ops give the same values and record nothing, and the flag is
    /// restored afterwards.
    #[test]
    fn without_grad_gives_the_same_values_untracked() {
        let mut rng = crate::init::seeded_rng(5);
        let x = Var::from_tensor(
            &crate::init::normal(&mut rng, &[2, 3, 8], 1.0, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let w = crate::init::normal(&mut rng, &[4, 8], 1.0, DType::F32, &Device::Cpu).unwrap();
        let with = linear(x.as_tensor(), &w, None).unwrap();
        assert!(with.track_op());
        let without = without_grad(|| linear(x.as_tensor(), &w, None).unwrap());
        assert!(!without.track_op());
        let diff = (with - &without)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        assert!(grad_enabled());
    }
}
