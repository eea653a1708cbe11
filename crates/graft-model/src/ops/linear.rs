//! Projections: dense, quantized, and with low-rank updates.
use super::dispatch::{fused, input};
use super::{cpu, reference};
use candle_core::backend::BackendStorage;
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
    frozen_linear(x, cpu::FrozenWeight::Dense(weight.clone()), bias)
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
    frozen_linear(x, cpu::FrozenWeight::Quantized(weight.clone()), None)
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

/// `x · Wᵀ + bias` through a frozen weight and bias, off the fused kernels: one node, see
/// [`FrozenLinear`].
fn frozen_linear(x: &Tensor, weight: cpu::FrozenWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = bias.map(|b| b.detach().to_dtype(x.dtype())).transpose()?;
    x.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(FrozenLinear { weight, bias })))
}

/// The frozen projection off the CPU kernels (CUDA, `GRAFT_REFERENCE_OPS`). Its forward is
/// candle's matmul and broadcast add run on the storages, the arithmetic of
/// [`reference::linear`], so the graph holds the output once (a product computed outside the
/// graph and copied in was held twice); its backward carries only the input gradient, `dy · W`
/// (no weight gradient for a frozen weight). A quantized W is dequantized for each direction
/// and dropped.
struct FrozenLinear {
    weight: cpu::FrozenWeight,
    /// In the input's dtype.
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// The product on storages of one backend; `of` finds that backend's storage in a tensor.
    fn product<S: BackendStorage>(
        &self,
        x: &S,
        layout: &Layout,
        of: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let foreign = || candle_core::Error::Msg("frozen-linear: tensors on two devices".into());
        let (out_f, in_f) = self.weight.dims()?;
        let dims = layout.dims();
        if dims.last() != Some(&in_f) || !layout.is_contiguous() {
            candle_core::bail!(
                "frozen-linear: input {dims:?} does not fit a weight of [{out_f}, {in_f}]"
            )
        }
        let rows = layout.shape().elem_count() / in_f.max(1);
        let weight = self.weight.whole(x.dtype())?;
        let (w, w_layout) = weight.storage_and_layout();
        let mut out = x.matmul(
            of(&w).ok_or_else(foreign)?,
            (1, rows, out_f, in_f),
            &Layout::contiguous_with_offset((rows, in_f), layout.start_offset()),
            &w_layout.transpose(0, 1)?,
        )?;
        if let Some(bias) = &self.bias {
            let (b, b_layout) = bias.storage_and_layout();
            out = out.binary_impl::<candle_core::op::Add>(
                of(&b).ok_or_else(foreign)?,
                &Layout::contiguous((rows, out_f)),
                &b_layout.broadcast_as((rows, out_f))?,
            )?;
        }
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out_f;
        }
        Ok((out, Shape::from(shape)))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.product(x, layout, super::types::cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.product(x, layout, super::types::cuda_storage)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let weight = self.weight.whole(grad_res.dtype())?;
        let (out_f, _) = weight.dims2()?;
        let rows = grad_res.elem_count() / out_f.max(1);
        let grad_x = grad_res
            .reshape((rows, out_f))?
            .matmul(&weight)?
            .reshape(arg.shape())?;
        Ok(Some(grad_x.to_dtype(arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::dispatch::{grad_enabled, without_grad};
    use candle_core::{DType, Device, Var};

    /// The frozen product off the kernels computes what the composition does, bit for bit,
    /// forward and input gradient, with and without a bias, on an input that starts inside
    /// its storage and on a transposed one; an untracked input records nothing.
    #[test]
    fn frozen_product_is_the_composition() {
        let mut rng = crate::init::seeded_rng(8);
        let mut draw = |shape: &[usize]| {
            crate::init::normal(&mut rng, shape, 1.0, DType::F64, &Device::Cpu).unwrap()
        };
        let (w, b, upstream) = (draw(&[5, 8]), draw(&[5]), draw(&[2, 3, 5]));
        let storage = Var::from_tensor(&draw(&[3, 3, 8])).unwrap();
        let base = Var::from_tensor(&draw(&[2, 8, 3])).unwrap();
        let inputs = [
            (&storage, storage.as_tensor().narrow(0, 1, 2).unwrap()),
            (&base, base.as_tensor().transpose(1, 2).unwrap()),
        ];
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (var, x) in inputs {
            for bias in [None, Some(&b)] {
                let ours = frozen_linear(&x, cpu::FrozenWeight::Dense(w.clone()), bias).unwrap();
                let theirs = reference::linear(&x, &w, bias).unwrap();
                assert_eq!(ours.dims(), [2, 3, 5]);
                assert_eq!(values(&ours), values(&theirs));
                let grad = |y: Tensor| {
                    let g = (y * &upstream)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    values(g.get(var.as_tensor()).unwrap())
                };
                assert_eq!(grad(ours), grad(theirs));
            }
        }
        let untracked = frozen_linear(&w, cpu::FrozenWeight::Dense(w.clone()), None).unwrap();
        assert!(!untracked.track_op());
    }

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
