//! The AdaLoRA update of one linear site, an SVD-shaped `P·Λ·Q`:
//! `y = base + scale · dropout(x) · (A⊙E)ᵀ · Bᵀ` with `A = Q` `[r, in]`, `E = Λ` `[r, 1]`,
//! `B = P` `[out, r]`, and the orthogonality regulariser on P and Q.
use graft_peft::candle::{DType, Result, Tensor, Var};
use graft_peft::graft_model::LowRank;
use graft_peft::sites::{trainable, LowRankLayer};

pub struct AdaLoraLayer {
    /// `[r, in]`, normal(0, 0.02): the right singular vectors (rows).
    pub a: Var,
    /// `[r, 1]`, zero initialised: the singular values; pruning zeroes entries.
    pub e: Var,
    /// `[out, r]`, normal(0, 0.02): the left singular vectors (columns).
    pub b: Var,
    /// `lora_alpha / (init_r + 1e-5)`.
    pub scale: f64,
}

impl AdaLoraLayer {
    /// A layer that trains `a` `[r, in]`, `e` `[r, 1]` and `b` `[out, r]` from these values.
    pub fn new([a, e, b]: [Tensor; 3], scale: f64) -> Result<Self> {
        let [a, e, b] = trainable([a, e, b])?;
        Ok(Self { a, e, b, scale })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `A⊙E`, E broadcast over A's rows.
    fn scaled_a(&self, dtype: DType) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(dtype)?;
        a.broadcast_mul(&self.e.as_tensor().to_dtype(dtype)?)
    }

    /// `scale · B·(A⊙E)`, the `[out, in]` weight delta that merging adds to the base weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (out, inp) = (self.b.dims()[0], self.a.dims()[1]);
        if self.rank() == 0 {
            return Tensor::zeros((out, inp), self.a.dtype(), self.a.device());
        }
        let b = self.b.as_tensor();
        b.matmul(&self.scaled_a(b.dtype())?)? * self.scale
    }

    /// `‖A·Aᵀ − I‖²_F` and `‖Bᵀ·B − I‖²_F` (squared: see [`orth_penalty`] for the root).
    pub fn orth_squares(&self) -> Result<[Tensor; 2]> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let r = self.rank();
        if r == 0 {
            // PEFT counts an empty factor with norm 0.
            let zero = Tensor::zeros((), a.dtype(), a.device())?;
            return Ok([zero.clone(), zero]);
        }
        let eye = Tensor::eye(r, a.dtype(), a.device())?;
        let square = |c: Tensor| (c - &eye)?.sqr()?.sum_all();
        Ok([square(a.matmul(&a.t()?)?)?, square(b.t()?.matmul(b)?)?])
    }
}

/// PEFT's regulariser: `weight · mean over every factor of ‖C − I‖_F`, from the squared norms.
///
/// The root is exact (no epsilon). Its gradient is infinite where a norm is exactly 0; torch's
/// `norm` backward uses the subgradient 0 there, and so does this: a term whose square is
/// exactly 0 is left out of the sum (value 0 either way), which costs one read of the squares.
pub fn orth_penalty(squares: &[Tensor], weight: f64) -> Result<Option<Tensor>> {
    if squares.is_empty() {
        return Ok(None);
    }
    let stacked = Tensor::stack(squares, 0)?;
    let values = stacked.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let nonzero: Vec<u32> = (0..values.len() as u32)
        .filter(|&i| values[i as usize] != 0.0)
        .collect();
    let roots = if nonzero.len() == values.len() {
        stacked.sqrt()?.sum_all()?
    } else if nonzero.is_empty() {
        Tensor::zeros((), stacked.dtype(), stacked.device())?
    } else {
        let index = Tensor::new(nonzero.as_slice(), stacked.device())?;
        stacked.index_select(&index, 0)?.sqrt()?.sum_all()?
    };
    (roots * (weight / values.len() as f64)).map(Some)
}

impl LowRankLayer for AdaLoraLayer {
    /// The update as the model adds it to the site's output, `(x ⊙ keep) · (A⊙E)ᵀ ·
    /// (scale·B)ᵀ`, or `None` for a rank-0 site; `keep` is an optional dropout mask over `x`
    /// (already divided by the keep probability).
    fn update(&self, dtype: DType, keep: Option<Tensor>) -> Result<Option<LowRank>> {
        if self.rank() == 0 {
            return Ok(None);
        }
        Ok(Some(LowRank {
            a: self.scaled_a(dtype)?,
            b: (self.b.as_tensor().to_dtype(dtype)? * self.scale)?,
            input_mask: keep,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_peft::candle::Device;
    use graft_peft::graft_model::init;
    use graft_peft::graft_model::ops::low_rank_delta;
    use proptest::prelude::*;

    fn var(t: Tensor) -> Var {
        Var::from_tensor(&t).unwrap()
    }

    fn random(rng: &mut init::SeededRng, shape: &[usize]) -> Tensor {
        init::normal(rng, shape, 0.5, DType::F64, &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    /// A signed permutation matrix `[n, n]`: orthogonal in both directions.
    fn signed_permutation(n: usize, perm: &[usize], signs: &[bool]) -> Vec<Vec<f64>> {
        let mut m = vec![vec![0.0; n]; n];
        for (row, &col) in perm.iter().enumerate() {
            m[row][col] = if signs[row] { -1.0 } else { 1.0 };
        }
        m
    }

    /// The first `rows` rows of a signed permutation of size `n` (orthonormal rows).
    fn orthonormal_rows(rows: usize, n: usize, seed: u64) -> Tensor {
        // A random permutation: the order of n uniform keys.
        let mut rng = init::seeded_rng(seed);
        let keys = init::uniform(&mut rng, &[n], 1.0, DType::F64, &Device::Cpu)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let mut perm: Vec<usize> = (0..n).collect();
        perm.sort_by(|&i, &j| keys[i].total_cmp(&keys[j]));
        let signs: Vec<bool> = (0..n).map(|i| (seed >> (i % 64)) & 1 == 1).collect();
        let m = signed_permutation(n, &perm, &signs);
        Tensor::new(m, &Device::Cpu)
            .unwrap()
            .narrow(0, 0, rows)
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Orthonormal rows of A and columns of B give a penalty of ~0; random factors do not.
        #[test]
        fn orthogonality_term_vanishes_only_for_orthogonal_factors(
            out in 1usize..20, inp in 1usize..20, r in 1usize..9, seed in any::<u64>(),
        ) {
            let r = r.min(out).min(inp);
            let a = orthonormal_rows(r, inp, seed);
            let b = orthonormal_rows(r, out, seed.rotate_left(7)).t().unwrap().contiguous().unwrap();
            let e = Tensor::ones((r, 1), DType::F64, &Device::Cpu).unwrap();
            let orthogonal = AdaLoraLayer { a: var(a), e: var(e.clone()), b: var(b), scale: 1.0 };
            let squares = orthogonal.orth_squares().unwrap();
            let penalty = orth_penalty(&squares, 0.5).unwrap().unwrap();
            prop_assert!(scalar(&penalty).abs() <= 1e-5);

            let mut rng = init::seeded_rng(seed);
            let random_layer = AdaLoraLayer {
                a: var(random(&mut rng, &[r, inp])),
                e: var(e),
                b: var(random(&mut rng, &[out, r])),
                scale: 1.0,
            };
            let penalty = orth_penalty(&random_layer.orth_squares().unwrap(), 0.5).unwrap().unwrap();
            prop_assert!(scalar(&penalty) > 0.0);
        }
    }

    /// x·(W + s·B·(A⊙E))ᵀ equals x·Wᵀ + s·(x·(A⊙E)ᵀ)·Bᵀ.
    #[test]
    fn merge_equals_forward() {
        graft_testkit::check_merge_equals_forward(
            |rng, c| AdaLoraLayer {
                a: var(random(rng, &[c.r, c.inp])),
                e: var(random(rng, &[c.r, 1])),
                b: var(random(rng, &[c.out, c.r])),
                scale: c.alpha / (c.r as f64 + 1e-5),
            },
            |layer| layer.delta_weight().unwrap(),
            1e-5,
            |_, _, _, _| Ok(()),
        );
    }

    #[test]
    fn penalty_is_the_mean_of_frobenius_norms_and_its_gradient_is_zero_at_zero() {
        // A = 2·I₂ (‖AAᵀ − I‖ = ‖3I‖ = 3·√2), B = I₂ (norm 0): mean (3√2 + 0) / 2, weight 0.5.
        let a = var((Tensor::eye(2, DType::F64, &Device::Cpu).unwrap() * 2.0).unwrap());
        let b = var(Tensor::eye(2, DType::F64, &Device::Cpu).unwrap());
        let e = var(Tensor::zeros((2, 1), DType::F64, &Device::Cpu).unwrap());
        let layer = AdaLoraLayer {
            a: a.clone(),
            e,
            b: b.clone(),
            scale: 1.0,
        };
        let penalty = orth_penalty(&layer.orth_squares().unwrap(), 0.5)
            .unwrap()
            .unwrap();
        let want = 0.5 * 3.0 * 2f64.sqrt() / 2.0;
        assert!((scalar(&penalty) - want).abs() < 1e-12);
        let grads = penalty.backward().unwrap();
        let gb = grads
            .get(b.as_tensor())
            .map(|g| g.abs().unwrap().sum_all().unwrap());
        assert!(
            gb.is_none_or(|g| scalar(&g) == 0.0),
            "B has a finite zero gradient"
        );
        let ga = grads.get(a.as_tensor()).unwrap();
        assert!(ga
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
    }

    #[test]
    fn e_zero_means_no_change() {
        let mut rng = init::seeded_rng(1);
        let layer = AdaLoraLayer {
            a: var(random(&mut rng, &[3, 7])),
            e: var(Tensor::zeros((3, 1), DType::F64, &Device::Cpu).unwrap()),
            b: var(random(&mut rng, &[5, 3])),
            scale: 2.0,
        };
        let x = random(&mut rng, &[4, 7]);
        let delta = low_rank_delta(&x, &layer.update(x.dtype(), None).unwrap().unwrap()).unwrap();
        assert_eq!(scalar(&delta.abs().unwrap().sum_all().unwrap()), 0.0);
        assert_eq!(
            scalar(
                &layer
                    .delta_weight()
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            ),
            0.0
        );
    }
}
