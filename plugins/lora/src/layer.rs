//! The LoRA update of one linear site: `y = base + scale · dropout(x) · Aᵀ · Bᵀ`.
use graft_peft::candle::{Result, Tensor, Var};

pub struct LoraLayer {
    /// `[r, in]`, kaiming-uniform initialised.
    pub a: Var,
    /// `[out, r]`, zero initialised so that training starts from the base model.
    pub b: Var,
    pub scale: f64,
}

impl LoraLayer {
    /// The update to add to the site's output; `keep` is an optional dropout mask over `x`
    /// (already divided by the keep probability).
    pub fn delta_output(&self, x: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        let x = match keep {
            Some(mask) => x.broadcast_mul(mask)?,
            None => x.clone(),
        };
        let a = self.a.as_tensor().to_dtype(x.dtype())?;
        let b = self.b.as_tensor().to_dtype(x.dtype())?;
        let down = x.broadcast_matmul(&a.t()?)?;
        down.broadcast_matmul(&b.t()?)? * self.scale
    }

    /// `scale · B·A`, the `[out, in]` weight delta that merging adds to the base weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}
