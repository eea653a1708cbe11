//! Properties of a low-rank layer's math over random shapes (proptest), for LoRA-family methods.
use candle_core::{DType, Device, Tensor};
use graft_model::init::{self, SeededRng};
use graft_model::ops::{linear, low_rank_delta};
use graft_peft::sites::LowRankLayer;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// One random case: a layer `[out, in]` of rank `r` with scale numerator `alpha`, and an input
/// of `rows` rows.
#[derive(Debug, Clone, Copy)]
pub struct LowRankCase {
    pub out: usize,
    pub inp: usize,
    pub r: usize,
    pub alpha: f64,
    pub rows: usize,
    pub seed: u64,
}

/// Merging changes no output: for 48 random cases (out and in below 24, rank below 9, alpha in
/// [0.1, 64), 1 to 4 rows), `make` builds a layer with f64 factors from the case's generator,
/// and `x·(W + ΔW)ᵀ` must equal `x·Wᵀ + low_rank_delta(x, update)` within `tolerance`
/// (`delta_weight` gives ΔW). `then` checks more of the same case (given W and W + ΔW).
pub fn check_merge_equals_forward<L: LowRankLayer>(
    make: impl Fn(&mut SeededRng, &LowRankCase) -> L,
    delta_weight: impl Fn(&L) -> Tensor,
    tolerance: f64,
    then: impl Fn(&LowRankCase, &L, &Tensor, &Tensor) -> Result<(), TestCaseError>,
) {
    let cases = (
        1usize..24,
        1usize..24,
        1usize..9,
        0.1f64..64.0,
        1usize..5,
        any::<u64>(),
    );
    let mut runner = TestRunner::new(Config::with_cases(48));
    let outcome = runner.run(&cases, |(out, inp, r, alpha, rows, seed)| {
        let case = LowRankCase {
            out,
            inp,
            r,
            alpha,
            rows,
            seed,
        };
        let mut rng = init::seeded_rng(seed);
        let layer = make(&mut rng, &case);
        let normal = |rng: &mut SeededRng, shape: &[usize]| {
            init::normal(rng, shape, 1.0, DType::F64, &Device::Cpu).unwrap()
        };
        let w = normal(&mut rng, &[out, inp]);
        let x = normal(&mut rng, &[rows, inp]);
        let update = layer.update(x.dtype(), None).unwrap().unwrap();
        let unmerged =
            (linear(&x, &w, None).unwrap() + low_rank_delta(&x, &update).unwrap()).unwrap();
        let merged_w = (&w + delta_weight(&layer)).unwrap();
        let merged = linear(&x, &merged_w, None).unwrap();
        let diff = crate::max_abs_diff(&merged, &unmerged).unwrap();
        prop_assert!(
            diff <= tolerance,
            "merged and unmerged outputs differ by {diff}"
        );
        then(&case, &layer, &w, &merged_w)
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
