//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), learning-rate schedules and
//! global-norm gradient clipping: candle ships only plain AdamW and SGD.
use crate::config::Schedule;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

pub struct ParamGroup {
    pub vars: Vec<Var>,
    pub lr: f64,
    pub weight_decay: f64,
}

struct State {
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    groups: Vec<(ParamGroup, Vec<State>)>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: usize,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        let groups = groups
            .into_iter()
            .map(|g| {
                let states = g
                    .vars
                    .iter()
                    .map(|v| {
                        Ok(State {
                            m: v.zeros_like()?,
                            v: v.zeros_like()?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((g, states))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            groups,
            beta1,
            beta2,
            eps,
            step: 0,
        })
    }

    /// Moment estimates under `group{g}.{i}.m` / `.v`, and the number of steps taken.
    pub fn state(&self) -> (usize, Vec<(String, Tensor)>) {
        let mut tensors = Vec::new();
        for (g, (_, states)) in self.groups.iter().enumerate() {
            for (i, s) in states.iter().enumerate() {
                tensors.push((format!("group{g}.{i}.m"), s.m.clone()));
                tensors.push((format!("group{g}.{i}.v"), s.v.clone()));
            }
        }
        (self.step, tensors)
    }

    /// Restores what [`AdamW::state`] returned, checking that every moment is present with
    /// its parameter's shape.
    pub fn restore(
        &mut self,
        step: usize,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        for (g, (group, states)) in self.groups.iter_mut().enumerate() {
            for (i, (var, s)) in group.vars.iter().zip(states.iter_mut()).enumerate() {
                for (which, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                    let key = format!("group{g}.{i}.{which}");
                    let t = tensors.get(&key).ok_or_else(|| {
                        candle_core::Error::Msg(format!("optimizer state `{key}` is missing"))
                    })?;
                    if t.dims() != var.dims() {
                        candle_core::bail!(
                            "optimizer state `{key}` has shape {:?}, its parameter {:?}",
                            t.dims(),
                            var.dims()
                        );
                    }
                    *slot = t.to_dtype(var.dtype())?.to_device(var.device())?;
                }
            }
        }
        self.step = step;
        Ok(())
    }

    /// One update with every group's lr multiplied by `lr_factor` (the schedule's value).
    pub fn step(&mut self, grads: &GradStore, lr_factor: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2 = 1.0 - self.beta2.powi(t);
        for (group, states) in &mut self.groups {
            let lr = group.lr * lr_factor;
            for (var, state) in group.vars.iter().zip(states.iter_mut()) {
                let Some(g) = grads.get(var.as_tensor()) else {
                    continue;
                };
                // A gradient computed by candle's backward from forward tensors still records
                // those ops; kept in the moments, it would keep every step's graph alive
                // (measured: +140 MB per AdaLoRA step on SmolLM2).
                let g = &g.detach();
                state.m = ((&state.m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
                state.v = ((&state.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
                let m_hat = (&state.m / bias1)?;
                let v_hat = (&state.v / bias2)?;
                let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
                let decayed = (var.as_tensor() * (1.0 - lr * group.weight_decay))?;
                var.set(&(decayed - (update * lr)?)?)?;
            }
        }
        Ok(())
    }
}

/// Whether every entry of every var is finite: `0 * x` is 0 for finite entries and NaN for
/// infinite or NaN ones (a sum of squares would overflow on large finite values).
pub fn all_finite(vars: &[Var]) -> Result<bool> {
    let probes = vars
        .iter()
        .map(|var| f64_sum(&var.as_tensor().affine(0.0, 0.0)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(read_total(probes)? == 0.0)
}

/// The sum of every entry of `t`, in its own dtype, as an f64 scalar on its device.
fn f64_sum(t: &Tensor) -> Result<Tensor> {
    t.sum_all()?.to_dtype(candle_core::DType::F64)
}

/// The total of f64 scalars, added on their device and read back once: one transfer per step
/// however many tensors train (a read per tensor waits for the device each time).
fn read_total(parts: Vec<Tensor>) -> Result<f64> {
    if parts.is_empty() {
        return Ok(0.0);
    }
    Tensor::stack(&parts, 0)?.sum_all()?.to_scalar::<f64>()
}

/// The learning-rate factor at `step` (0-based) of `total`: linear warm-up, then decay.
pub fn lr_factor(schedule: Schedule, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => 1.0 - progress,
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Global L2 norm of the gradients of `vars`: each tensor's sum of squares in its dtype, the
/// sums added in f64 on the device, one read.
pub fn global_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let squares = vars
        .iter()
        .filter_map(|var| grads.get(var.as_tensor()))
        .map(|g| f64_sum(&g.sqr()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(read_total(squares)?.sqrt())
}

/// Scales every gradient by `factor` in place in the store.
pub fn scale_grads(grads: &mut GradStore, vars: &[Var], factor: f64) -> Result<()> {
    for var in vars {
        if let Some(g) = grads.remove(var.as_tensor()) {
            grads.insert(var.as_tensor(), (g * factor)?);
        }
    }
    Ok(())
}

/// Adds `other`'s gradients of `vars` into `into` (gradient accumulation).
pub fn accumulate(into: &mut GradStore, other: GradStore, vars: &[Var]) -> Result<()> {
    let mut other = other;
    for var in vars {
        if let Some(g) = other.remove(var.as_tensor()) {
            let sum = match into.remove(var.as_tensor()) {
                Some(existing) => (existing + g)?,
                None => g,
            };
            into.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// Dynamic loss scaling for f16 activations, as PyTorch's GradScaler does it: the loss is
/// multiplied by [`LossScaler::scale`] before the backward, so that small gradients survive
/// f16's narrow range (its smallest normal is 6e-5), and the gradients are divided by it after.
/// A step whose gradients overflowed (inf or NaN) is skipped and the scale halved; after
/// `growth_interval` good steps in a row the scale doubles.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    scale: f64,
    good_steps: usize,
    growth_interval: usize,
}

impl Default for LossScaler {
    /// GradScaler's defaults: 2^16, doubling after 2000 good steps.
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Divides the gradients of `vars` by the scale. Returns false when they are not finite:
    /// the step must then be skipped, and the scale has been halved.
    pub fn unscale(&mut self, grads: &mut GradStore, vars: &[Var]) -> Result<bool> {
        if !global_norm(grads, vars)?.is_finite() {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            return Ok(false);
        }
        scale_grads(grads, vars, 1.0 / self.scale)?;
        self.good_steps += 1;
        if self.good_steps == self.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((lr_factor(Schedule::Linear, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((lr_factor(Schedule::Linear, 9, 100, 10) - 1.0).abs() < 1e-12);
        assert!((lr_factor(Schedule::Linear, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!(lr_factor(Schedule::Linear, 99, 100, 10) < 0.02);
        assert!((lr_factor(Schedule::Cosine, 55, 100, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Constant, 80, 100, 10), 1.0);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_its_gradient() {
        // With bias correction the first Adam update is lr * sign(g) (for |g| >> eps); decay
        // multiplies the weight by (1 - lr * wd) first.
        let var = Var::new(&[1.0f64, -2.0, 3.0], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * &Tensor::new(&[2.0f64, -1.0, 0.5], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = AdamW::new(
            vec![ParamGroup {
                vars: vec![var.clone()],
                lr: 0.1,
                weight_decay: 0.5,
            }],
            0.9,
            0.999,
            1e-12,
        )
        .unwrap();
        opt.step(&grads, 1.0).unwrap();
        let got = var.as_tensor().to_vec1::<f64>().unwrap();
        let want = [1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1, 3.0 * 0.95 - 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }

    /// A gradient that records ops on other tracked tensors (as candle's backward gives for
    /// a weight multiplied by an activation) must not chain the moments to that graph.
    #[test]
    fn moments_hold_no_graph() {
        let var = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let other = Var::new(&[0.5f64, 4.0], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * (other.as_tensor() * 3.0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(var.as_tensor()).unwrap().track_op(),
            "the premise: candle's gradient records ops"
        );
        let mut opt = AdamW::new(
            vec![ParamGroup {
                vars: vec![var.clone()],
                lr: 0.1,
                weight_decay: 0.0,
            }],
            0.9,
            0.999,
            1e-8,
        )
        .unwrap();
        opt.step(&grads, 1.0).unwrap();
        for (name, t) in opt.state().1 {
            assert!(!t.track_op(), "{name} keeps the step's graph");
        }
    }

    #[test]
    fn clipping_scales_to_the_norm_limit() {
        let var = Var::new(&[0.0f64, 0.0], &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * &Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = vec![var.clone()];
        assert!((global_norm(&grads, &vars).unwrap() - 5.0).abs() < 1e-12);
        scale_grads(&mut grads, &vars, 0.2).unwrap();
        assert!((global_norm(&grads, &vars).unwrap() - 1.0).abs() < 1e-12);
    }

    /// The norm read once equals the per-tensor reads it replaced (each tensor's f32 sum of
    /// squares, added in f64 on the host): bit for bit on the CPU, which adds in the same
    /// order. A var without a gradient counts nothing; one non-finite var is found among many.
    #[test]
    fn one_read_norm_equals_per_tensor_reads() {
        let mut rng = graft_model::init::seeded_rng(4);
        let vars: Vec<Var> = [[3, 5], [7, 2], [1, 9], [4, 4]]
            .iter()
            .map(|shape| {
                let t = graft_model::init::normal(
                    &mut rng,
                    shape,
                    1.0,
                    candle_core::DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
                Var::from_tensor(&t).unwrap()
            })
            .collect();
        let mut grads = GradStore::default();
        for var in &vars[..3] {
            grads.insert(var.as_tensor(), (var.as_tensor() * 1.7).unwrap());
        }
        let mut host = 0.0f64;
        for var in &vars[..3] {
            let g = grads.get(var.as_tensor()).unwrap();
            host += f64::from(
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
        }
        assert_eq!(global_norm(&grads, &vars).unwrap(), host.sqrt());
        assert!(all_finite(&vars).unwrap());
        vars[2]
            .set(&Tensor::new(&[[f32::INFINITY; 9]], &Device::Cpu).unwrap())
            .unwrap();
        assert!(!all_finite(&vars).unwrap());
    }

    /// Overflowing gradients skip the step and halve the scale; finite ones are divided by
    /// it, and the scale doubles after its interval of good steps.
    #[test]
    fn loss_scaler_skips_overflow_and_grows() {
        use candle_core::{Device, Tensor};
        let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut scaler = LossScaler {
            growth_interval: 2,
            ..LossScaler::default()
        };
        let vars = std::slice::from_ref(&var);
        let grads_of = |values: &[f32]| {
            let mut grads = GradStore::default();
            grads.insert(var.as_tensor(), Tensor::new(values, &Device::Cpu).unwrap());
            grads
        };
        let mut overflowed = grads_of(&[f32::INFINITY, 1.0]);
        assert!(!scaler.unscale(&mut overflowed, vars).unwrap());
        assert_eq!(scaler.scale(), 32768.0);
        let mut fine = grads_of(&[32768.0, -65536.0]);
        assert!(scaler.unscale(&mut fine, vars).unwrap());
        let unscaled: Vec<f32> = fine.get(var.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(unscaled, [1.0, -2.0]);
        assert_eq!(scaler.scale(), 32768.0);
        assert!(scaler.unscale(&mut grads_of(&[1.0, 1.0]), vars).unwrap());
        assert_eq!(scaler.scale(), 65536.0, "doubled after two good steps");
    }
}
