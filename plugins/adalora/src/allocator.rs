//! PEFT's `RankAllocator`: the cubic budget schedule, the smoothed importance of every
//! adapter element, and pruning the least important triplets to a budget.
use graft_peft::candle::{DType, Result, Tensor};
use std::collections::HashMap;

/// The budget schedule (in triplets, over all sites).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub init_bgt: usize,
    pub target_bgt: usize,
    pub tinit: usize,
    pub tfinal: usize,
    pub total_step: usize,
    pub delta_t: usize,
}

impl Schedule {
    /// The budget at `step` (counted from 1) and whether to prune to it: all of `init_bgt`
    /// through `tinit`, a cubic descent to `target_bgt` (pruning every `delta_t` steps), then
    /// `target_bgt` for the last `tfinal` steps.
    pub fn budget(&self, step: usize) -> (usize, bool) {
        if step <= self.tinit {
            return (self.init_bgt, false);
        }
        if step + self.tfinal > self.total_step {
            return (self.target_bgt, true);
        }
        let span = (self.total_step - self.tfinal - self.tinit) as f64;
        let mul = 1.0 - (step - self.tinit) as f64 / span;
        let (init, target) = (self.init_bgt as f64, self.target_bgt as f64);
        // Python's int(): truncation; powf is the C pow that Python's `**` calls.
        let budget = ((init - target) * mul.powf(3.0) + target) as usize;
        (budget, step.is_multiple_of(self.delta_t))
    }
}

/// Which triplets to keep: exactly `min(budget, total)` of them, the highest scores, ties
/// going to the earlier site and then the lower rank index (PEFT's kthvalue threshold with
/// `<=` prunes every tied triplet instead, ending below budget). NaN scores rank lowest.
pub fn keep_top(scores: &[Vec<f64>], budget: usize) -> Vec<Vec<bool>> {
    let mut order: Vec<(usize, usize, f64)> = scores
        .iter()
        .enumerate()
        .flat_map(|(s, site)| {
            site.iter()
                .enumerate()
                .map(move |(i, &v)| (s, i, if v.is_nan() { f64::NEG_INFINITY } else { v }))
        })
        .collect();
    // A stable sort: equal scores stay in (site, index) order.
    order.sort_by(|x, y| y.2.total_cmp(&x.2));
    let mut kept: Vec<Vec<bool>> = scores.iter().map(|s| vec![false; s.len()]).collect();
    for &(s, i, _) in order.iter().take(budget) {
        kept[s][i] = true;
    }
    kept
}

/// Exponential moving averages of one tensor's element importance `|p·∂L/∂p|`.
struct Smoothed {
    /// Sensitivity: EMA of the importance (beta1).
    ipt: Tensor,
    /// Uncertainty: EMA of |importance − sensitivity| (beta2).
    unc: Tensor,
}

/// Importance of every adapter tensor, by key, kept in f32.
pub struct Importance {
    beta1: f64,
    beta2: f64,
    smoothed: HashMap<String, Smoothed>,
}

impl Importance {
    pub fn new(beta1: f64, beta2: f64) -> Self {
        Self {
            beta1,
            beta2,
            smoothed: HashMap::new(),
        }
    }

    pub fn reset(&mut self) {
        self.smoothed.clear();
    }

    /// The smoothed sensitivity and uncertainty of every parameter, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.smoothed
            .iter()
            .flat_map(|(key, s)| {
                [
                    (format!("importance.{key}.ipt"), s.ipt.clone()),
                    (format!("importance.{key}.unc"), s.unc.clone()),
                ]
            })
            .collect()
    }

    /// Restores what [`Importance::state`] returned.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.smoothed.clear();
        for (name, ipt) in state {
            let Some(key) = name
                .strip_prefix("importance.")
                .and_then(|k| k.strip_suffix(".ipt"))
            else {
                continue;
            };
            let unc = state.get(&format!("importance.{key}.unc")).ok_or_else(|| {
                graft_peft::candle::Error::Msg(format!(
                    "importance of `{key}` lacks its uncertainty"
                ))
            })?;
            self.smoothed.insert(
                key.to_string(),
                Smoothed {
                    ipt: ipt.clone(),
                    unc: unc.clone(),
                },
            );
        }
        Ok(())
    }

    /// One step's update from the parameter `p` and its gradient (`None`: zero).
    pub fn update(&mut self, key: &str, p: &Tensor, grad: Option<&Tensor>) -> Result<()> {
        let p = p.detach().to_dtype(DType::F32)?;
        let ipt = match grad {
            Some(g) => (&p * g.detach().to_dtype(DType::F32)?)?.abs()?,
            None => p.zeros_like()?,
        };
        let (old_ipt, old_unc) = match self.smoothed.get(key) {
            Some(s) => (s.ipt.clone(), s.unc.clone()),
            None => (ipt.zeros_like()?, ipt.zeros_like()?),
        };
        let ipt_avg = ((old_ipt * self.beta1)? + (&ipt * (1.0 - self.beta1))?)?;
        let unc = ((old_unc * self.beta2)? + ((ipt - &ipt_avg)?.abs()? * (1.0 - self.beta2))?)?;
        self.smoothed
            .insert(key.to_string(), Smoothed { ipt: ipt_avg, unc });
        Ok(())
    }

    /// Element scores `sensitivity · uncertainty` of `key`, if it was ever updated.
    fn score(&self, key: &str) -> Result<Option<Tensor>> {
        self.smoothed.get(key).map(|s| &s.ipt * &s.unc).transpose()
    }

    /// Score of each of a site's `rank` triplets: E's element score plus the mean score of A's
    /// row and of B's column (zero for a tensor never updated).
    pub fn triplet_scores(&self, [a, e, b]: [&str; 3], rank: usize) -> Result<Vec<f64>> {
        let mut total = vec![0.0; rank];
        if rank == 0 {
            return Ok(total);
        }
        let parts = [
            self.score(a)?.map(|s| s.mean(1)).transpose()?,
            self.score(e)?.map(|s| s.flatten_all()).transpose()?,
            self.score(b)?.map(|s| s.mean(0)).transpose()?,
        ];
        for part in parts.into_iter().flatten() {
            let values = part.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for (t, v) in total.iter_mut().zip(values) {
                *t += v;
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_peft::candle::Device;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Exactly the budget (or everything) is kept, and every kept score is at least every
        /// pruned one; ties (scores drawn from a few values) included.
        #[test]
        fn masking_keeps_exactly_the_budget(
            sites in prop::collection::vec(prop::collection::vec(0u8..4, 0..10), 1..8),
            fraction in 0.0f64..=1.0,
        ) {
            let scores: Vec<Vec<f64>> =
                sites.iter().map(|s| s.iter().map(|&v| v as f64 * 0.25).collect()).collect();
            let total: usize = scores.iter().map(Vec::len).sum();
            let budget = (fraction * total as f64).round() as usize;
            let kept = keep_top(&scores, budget);
            prop_assert_eq!(kept.iter().flatten().filter(|&&k| k).count(), budget);
            let by = |keep: bool| scores.iter().zip(&kept).flat_map(move |(s, k)| {
                s.iter().zip(k).filter(move |(_, &kk)| kk == keep).map(|(v, _)| *v)
            });
            let lowest_kept = by(true).fold(f64::INFINITY, f64::min);
            let highest_pruned = by(false).fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(lowest_kept >= highest_pruned);
            let everything = keep_top(&scores, total + 3);
            prop_assert!(everything.iter().flatten().all(|&k| k));
        }
    }

    #[test]
    fn ties_go_to_the_earlier_triplet() {
        let kept = keep_top(&[vec![1.0, 1.0], vec![1.0, 2.0]], 2);
        assert_eq!(kept, vec![vec![true, false], vec![false, true]]);
    }

    #[test]
    fn schedule_follows_peft() {
        let s = Schedule {
            init_bgt: 48,
            target_bgt: 24,
            tinit: 1,
            tfinal: 2,
            total_step: 10,
            delta_t: 2,
        };
        assert_eq!(s.budget(1), (48, false));
        // mul = 1 - 1/7: 24 · (6/7)³ + 24 = 39.11…
        assert_eq!(s.budget(2), (39, true));
        // 24 · (5/7)³ + 24 = 32.7…, not a pruning step.
        assert_eq!(s.budget(3), (32, false));
        assert_eq!(s.budget(8), (24, true));
        assert_eq!(s.budget(9), (24, true));
        assert_eq!(s.budget(11), (24, true));
    }

    #[test]
    fn importance_is_smoothed_sensitivity_times_uncertainty() {
        let dev = &Device::Cpu;
        let mut imp = Importance::new(0.85, 0.85);
        let p = Tensor::new(&[[2.0f32, -1.0]], dev).unwrap();
        let g = Tensor::new(&[[0.5f32, 3.0]], dev).unwrap();
        imp.update("A", &p, Some(&g)).unwrap();
        imp.update("A", &p, Some(&g)).unwrap();
        // ipt = |p·g| = [1, 3], smoothed twice; A's triplet score is its row's mean.
        let step = |avg: f64, unc: f64, ipt: f64| {
            let avg = 0.85 * avg + 0.15 * ipt;
            (avg, 0.85 * unc + 0.15 * (ipt - avg).abs())
        };
        let want: Vec<f64> = [1.0, 3.0]
            .iter()
            .map(|&i| {
                let (a, u) = step(0.0, 0.0, i);
                let (a, u) = step(a, u, i);
                a * u
            })
            .collect();
        let got = imp.triplet_scores(["A", "E", "B"], 1).unwrap();
        assert!(
            (got[0] - (want[0] + want[1]) / 2.0).abs() < 1e-6,
            "{got:?} {want:?}"
        );
    }
}
