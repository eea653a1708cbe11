//! IA3's rescaling of one linear site (Liu et al. 2022, "Few-Shot Parameter-Efficient
//! Fine-Tuning is Better and Cheaper than In-Context Learning").
//!
//! Attention keys and values are rescaled on their output, `y = (x·Wᵀ + b) ⊙ l` with `l` of
//! shape `[out, 1]`; feed-forward layers on their input, `y = (x ⊙ l)·Wᵀ + b` with `l` of shape
//! `[1, in]` (PEFT's layouts).
use graft_peft::candle::{Result, Tensor, Var};
use graft_peft::graft_model::ops;

pub struct Ia3Layer {
    pub scale: Var,
    pub feedforward: bool,
    /// The frozen base weight `[out, in]` and bias, needed by the forward alone (tests) and by
    /// merging (both depend on W, not only on `l`); `None` on a base that keeps it quantized.
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
}

impl Ia3Layer {
    /// The input the frozen projection reads: `x ⊙ l` at a feed-forward site.
    pub fn input(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.feedforward {
            return Ok(None);
        }
        let l = self.scale.as_tensor().to_dtype(x.dtype())?;
        Ok(Some(ops::scale_last_dim(x, &l)?))
    }

    /// The site's output given the frozen output `base` (of the scaled input, at a
    /// feed-forward site).
    pub fn output(&self, base: Tensor) -> Result<Tensor> {
        if self.feedforward {
            return Ok(base);
        }
        let l = self.scale.as_tensor().to_dtype(base.dtype())?;
        ops::scale_last_dim(&base, &l)
    }

    /// The site's output from its input alone (the two hooks in sequence), for tests.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let input = self.input(x)?;
        let base = ops::linear(
            input.as_ref().unwrap_or(x),
            self.dense_weight()?,
            self.bias.as_ref(),
        )?;
        self.output(base)
    }

    fn dense_weight(&self) -> Result<&Tensor> {
        match &self.weight {
            Some(w) => Ok(w),
            None => graft_peft::candle::bail!(
                "the base weight is kept quantized; merging IA3 needs it unquantized"
            ),
        }
    }

    /// What merging adds to W and b: `W ⊙ (l - 1)` by rows (output scaling, and the bias
    /// `b ⊙ (l - 1)`) or by columns (input scaling).
    pub fn deltas(&self) -> Result<(Tensor, Option<Tensor>)> {
        let minus_one = (self.scale.as_tensor() - 1.0)?;
        let weight = self.dense_weight()?.broadcast_mul(&minus_one)?;
        let bias = match (&self.bias, self.feedforward) {
            (Some(b), false) => Some(b.mul(&minus_one.flatten_all()?)?),
            _ => None,
        };
        Ok((weight, bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_peft::candle::{DType, Device};
    use graft_peft::graft_model::init;
    use proptest::prelude::*;

    fn tensor(values: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn layer(l: Tensor, feedforward: bool, w: Tensor, b: Tensor) -> Ia3Layer {
        Ia3Layer {
            scale: Var::from_tensor(&l).unwrap(),
            feedforward,
            weight: Some(w),
            bias: Some(b),
        }
    }

    /// W = [[1, 2], [3, 4]], b = [0.5, -1], x = [1, 1]: x·Wᵀ + b = [3.5, 6].
    #[test]
    fn matches_hand_computed_values() {
        let (w, b, x) = (
            tensor(&[1.0, 2.0, 3.0, 4.0], &[2, 2]),
            tensor(&[0.5, -1.0], &[2]),
            tensor(&[1.0, 1.0], &[1, 2]),
        );
        // Output scaling by l = [2, 0.5]: [3.5·2, 6·0.5] = [7, 3].
        let out = layer(tensor(&[2.0, 0.5], &[2, 1]), false, w.clone(), b.clone());
        let y = out.forward(&x).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), [[7.0, 3.0]]);
        // Input scaling by l = [2, 0.5]: x ⊙ l = [2, 0.5];
        // [1·2 + 2·0.5 + 0.5, 3·2 + 4·0.5 - 1] = [3.5, 7].
        let ff = layer(tensor(&[2.0, 0.5], &[1, 2]), true, w, b);
        let y = ff.forward(&x).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), [[3.5, 7.0]]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Merged weights give the adapted output, for either kind of site.
        #[test]
        fn merge_equals_forward(out in 1usize..12, inp in 1usize..12, feedforward in any::<bool>(), seed in 0u64..1000) {
            let mut rng = init::seeded_rng(seed);
            let mut normal = |shape: &[usize]| init::normal(&mut rng, shape, 1.0, DType::F64, &Device::Cpu).unwrap();
            let (w, b, x) = (normal(&[out, inp]), normal(&[out]), normal(&[3, inp]));
            let l = if feedforward { normal(&[1, inp]) } else { normal(&[out, 1]) };
            let site = layer(l, feedforward, w.clone(), b.clone());
            let adapted = site.forward(&x).unwrap();
            let (dw, db) = site.deltas().unwrap();
            let merged_b = match db { Some(d) => (&b + d).unwrap(), None => b.clone() };
            let merged = ops::linear(&x, &(&w + dw).unwrap(), Some(&merged_b)).unwrap();
            let diff = graft_testkit::max_abs_diff(&adapted, &merged).unwrap();
            prop_assert!(diff <= 1e-9, "{}", diff);
        }
    }
}
