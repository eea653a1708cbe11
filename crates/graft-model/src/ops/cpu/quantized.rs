//! A product through a frozen quantized weight, `x · Wᵀ`, and its transpose `dy · W`: each
//! dequantizes W a block of rows at a time into the BLAS product, so the weight is never held
//! dequantized whole, and each is the other's backward (the input gradient of `x · Wᵀ` is
//! `dy · W`), so every hook below a quantized layer gets its true gradient.
use super::data::{contiguous, for_float};
use super::linear::FrozenWeight;
use crate::quant::QuantizedWeight;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use std::sync::Arc;

pub(crate) struct QuantizedLinear {
    pub weight: QuantizedWeight,
    /// `dy · W` (`[.., out]` to `[.., in]`) instead of `x · Wᵀ`.
    pub transposed: bool,
}

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "graft-quantized-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = self.weight.dims();
        let (from, to) = match self.transposed {
            false => (in_f, out_f),
            true => (out_f, in_f),
        };
        let mut dims = layout.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == from => *last = to,
            _ => bail!(
                "quantized linear: input {:?} does not fit a weight of [{out_f}, {in_f}]{}",
                layout.dims(),
                if self.transposed { " (transposed)" } else { "" }
            ),
        }
        let weight = FrozenWeight::Quantized(self.weight.clone());
        let out = for_float!(storage, "graft-quantized-linear", T => {
            let x = contiguous::<T>(storage, layout)?;
            let y = match self.transposed {
                false => weight.product(&x, None)?,
                true => weight.d_input(&x)?,
            };
            T::to_cpu_storage_owned(y)
        });
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        let other = QuantizedLinear {
            weight: self.weight.clone(),
            transposed: !self.transposed,
        };
        Ok(Some(
            grad.contiguous()?
                .apply_op1_arc(Arc::new(Box::new(other)))?
                .to_dtype(arg.dtype())?,
        ))
    }
}
