//! The LoRA update of one linear site: `y = base + scale · dropout(x) · Aᵀ · Bᵀ`.
use graft_peft::candle::{DType, Result, Tensor, Var};
use graft_peft::graft_model::LowRank;
use graft_peft::sites::{trainable, LowRankLayer};

pub struct LoraLayer {
    /// `[r, in]`, kaiming-uniform initialised.
    pub a: Var,
    /// `[out, r]`, zero initialised so that training starts from the base model.
    pub b: Var,
    pub scale: f64,
}

impl LowRankLayer for LoraLayer {
    /// The update as the model adds it to the site's output, `(x ⊙ keep) · Aᵀ · (scale·B)ᵀ`;
    /// `keep` is an optional dropout mask over `x` (already divided by the keep probability).
    /// The scale is folded into B (out x r) rather than applied to the output (tokens x out):
    /// one pass over the activations fewer, forward and backward.
    fn update(&self, dtype: DType, keep: Option<Tensor>) -> Result<Option<LowRank>> {
        Ok(Some(LowRank {
            a: self.a.as_tensor().to_dtype(dtype)?,
            b: (self.b.as_tensor().to_dtype(dtype)? * self.scale)?,
            input_mask: keep,
        }))
    }
}

impl LoraLayer {
    /// A layer that trains `a` `[r, in]` and `b` `[out, r]` from these values.
    pub fn new([a, b]: [Tensor; 2], scale: f64) -> Result<Self> {
        let [a, b] = trainable([a, b])?;
        Ok(Self { a, b, scale })
    }
    /// `scale · B·A`, the `[out, in]` weight delta that merging adds to the base weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_peft::candle::{DType, Device};
    use graft_peft::graft_model::init;
    use graft_peft::graft_model::ops::low_rank_delta;
    use proptest::prelude::*;

    fn layer(rng: &mut init::SeededRng, out: usize, inp: usize, r: usize, scale: f64) -> LoraLayer {
        let a = init::normal(rng, &[r, inp], 0.5, DType::F64, &Device::Cpu).unwrap();
        let b = init::normal(rng, &[out, r], 0.5, DType::F64, &Device::Cpu).unwrap();
        LoraLayer {
            a: Var::from_tensor(&a).unwrap(),
            b: Var::from_tensor(&b).unwrap(),
            scale,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        graft_testkit::max_abs_diff(a, b).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The update is linear in the scale: doubling alpha doubles it; rsLoRA scales by
        /// alpha/sqrt(r).
        #[test]
        fn update_scales_with_alpha_over_r(
            out in 1usize..16, inp in 1usize..16, r in 1usize..9, alpha in 0.1f64..32.0,
            seed in any::<u64>(),
        ) {
            let mut rng = init::seeded_rng(seed);
            let lora = layer(&mut rng, out, inp, r, alpha / r as f64);
            let doubled = LoraLayer { a: lora.a.clone(), b: lora.b.clone(), scale: 2.0 * alpha / r as f64 };
            let twice = (lora.delta_weight().unwrap() * 2.0).unwrap();
            prop_assert!(max_diff(&doubled.delta_weight().unwrap(), &twice) <= 1e-9 * (1.0 + alpha));
            let config = crate::LoraConfig::from_train_config(&serde_json::json!({
                "r": r, "lora_alpha": alpha, "use_rslora": true
            })).unwrap();
            prop_assert!((config.scale() - alpha / (r as f64).sqrt()).abs() < 1e-12);
        }
    }

    /// x·(W + s·B·A)ᵀ equals x·Wᵀ + s·(x·Aᵀ)·Bᵀ, and unmerging restores W.
    #[test]
    fn merge_equals_forward_and_unmerge_restores() {
        graft_testkit::check_merge_equals_forward(
            |rng, c| layer(rng, c.out, c.inp, c.r, c.alpha / c.r as f64),
            |lora| lora.delta_weight().unwrap(),
            1e-9,
            |c, lora, w, merged_w| {
                let restored = (merged_w - lora.delta_weight().unwrap()).unwrap();
                prop_assert!(max_diff(&restored, w) <= 1e-12 * (1.0 + c.alpha));
                Ok(())
            },
        );
    }

    #[test]
    fn b_zero_means_no_change() {
        let mut rng = init::seeded_rng(1);
        let lora = layer(&mut rng, 5, 7, 2, 2.0);
        lora.b.set(&lora.b.zeros_like().unwrap()).unwrap();
        let x = init::normal(&mut rng, &[3, 7], 1.0, DType::F64, &Device::Cpu).unwrap();
        assert_eq!(
            max_diff(
                &low_rank_delta(&x, &lora.update(x.dtype(), None).unwrap().unwrap()).unwrap(),
                &x.zeros_like().unwrap().narrow(1, 0, 5).unwrap()
            ),
            0.0
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = crate::LoraConfig::from_train_config(&serde_json::json!({ "r": 0 })).unwrap_err();
        assert!(err.to_string().contains("r must be at least 1"), "{err}");
        let err =
            crate::LoraConfig::from_train_config(&serde_json::json!({ "rank": 4 })).unwrap_err();
        assert!(err.to_string().contains("rank"), "{err}");
    }
}
