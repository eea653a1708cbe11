//! Autograd against central differences.
use crate::fixtures::{loss, scalar};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use graft_trainer::task::Classifier;
use rand::Rng;

/// One sampled comparison of autograd against central differences.
#[derive(Debug)]
pub struct GradientSample {
    pub tensor: String,
    pub index: usize,
    pub autograd: f64,
    pub numeric: f64,
}

impl GradientSample {
    pub fn relative_error(&self) -> f64 {
        let scale = self.autograd.abs().max(self.numeric.abs()).max(1e-7);
        (self.autograd - self.numeric).abs() / scale
    }
}

/// Sets one entry of `var` in place, touching only its row (tables can be large).
fn set_entry(var: &Var, index: usize, value: f64) -> Result<()> {
    let dims = var.dims();
    let row_len: usize = dims.iter().skip(1).product();
    let (row, col) = (index / row_len, index % row_len);
    let slab = var.as_tensor().narrow(0, row, 1)?;
    let mut values = slab.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    values[col] = value;
    let t = Tensor::from_vec(values, slab.shape(), var.device())?.to_dtype(var.dtype())?;
    Ok(var.as_tensor().slice_set(&t, 0, row)?)
}

/// Compares autograd with central differences (step `eps`) at `per_tensor` random entries of
/// every tensor whose name `select` accepts. Run it on an f64 classifier.
pub fn finite_difference_check(
    classifier: &Classifier,
    texts: &[String],
    labels: &[usize],
    select: impl Fn(&str) -> bool,
    per_tensor: usize,
    eps: f64,
    seed: u64,
) -> Result<Vec<GradientSample>> {
    finite_differences(
        &classifier.trainable(),
        &|| loss(classifier, texts, labels),
        select,
        per_tensor,
        eps,
        seed,
    )
}

/// The core of the gradient checks: `loss` is evaluated with entries of `trainable` moved.
pub(crate) fn finite_differences(
    trainable: &[(String, Var)],
    loss: &dyn Fn() -> Result<Tensor>,
    select: impl Fn(&str) -> bool,
    per_tensor: usize,
    eps: f64,
    seed: u64,
) -> Result<Vec<GradientSample>> {
    let grads = loss()?.backward()?;
    let mut rng = graft_model::init::seeded_rng(seed);
    let mut samples = Vec::new();
    for (name, var) in trainable.iter().filter(|(n, _)| select(n)) {
        let grad = grads
            .get(var.as_tensor())
            .ok_or_else(|| Error::Config(format!("{name} received no gradient")))?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let values = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        for _ in 0..per_tensor {
            let index = rng.random_range(0..values.len());
            set_entry(var, index, values[index] + eps)?;
            let plus = scalar(&loss()?)?;
            set_entry(var, index, values[index] - eps)?;
            let minus = scalar(&loss()?)?;
            set_entry(var, index, values[index])?;
            samples.push(GradientSample {
                tensor: name.clone(),
                index,
                autograd: grad[index],
                numeric: (plus - minus) / (2.0 * eps),
            });
        }
    }
    Ok(samples)
}

/// Relative error at most 1e-3 everywhere, the expected number of samples, and not all ~0.
pub(crate) fn judge_gradients(
    method: &str,
    samples: &[GradientSample],
    expected: usize,
) -> Result<()> {
    let wrong: Vec<String> = samples
        .iter()
        .filter(|s| s.relative_error() > 1e-3)
        .map(|s| {
            format!(
                "{} [{}]: autograd {:e} vs finite difference {:e}",
                s.tensor, s.index, s.autograd, s.numeric
            )
        })
        .collect();
    if !wrong.is_empty() {
        return Err(Error::Check(format!(
            "{method}: gradients disagree with finite differences:\n{}",
            wrong.join("\n")
        )));
    }
    if samples.len() != expected {
        return Err(Error::Check(format!(
            "{method}: sampled {} entries, expected {expected}",
            samples.len()
        )));
    }
    if !samples.iter().any(|s| s.autograd.abs() > 1e-6) {
        return Err(Error::Check(format!(
            "{method}: every sampled gradient is ~0, the check proves nothing"
        )));
    }
    Ok(())
}
