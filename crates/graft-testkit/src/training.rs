//! A few AdamW steps, noting which trainable tensors got no gradient.
use crate::fixtures::{loss, scalar};
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use graft_trainer::optim::{AdamW, ParamGroup};
use graft_trainer::task::Classifier;

/// What every training check asks of a run named `name`: every trainable tensor had a
/// gradient at the last step (`silent` names those that had none) and the loss fell by 10 %.
pub(crate) fn judge_training(name: &str, losses: &[f64], silent: &[String]) -> Result<()> {
    if !silent.is_empty() {
        return Err(Error::Check(format!(
            "{name}: no gradient at the last step for {silent:?}"
        )));
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    if last >= first * 0.9 {
        return Err(Error::Check(format!(
            "{name}: loss did not fall by 10%: {losses:?}"
        )));
    }
    Ok(())
}

/// Trains `steps` AdamW steps on one real batch; returns the losses and the names of
/// trainable tensors whose gradient was missing or all zero at the last step.
pub fn train_steps(
    classifier: &mut Classifier,
    texts: &[String],
    labels: &[usize],
    steps: usize,
    lr: f64,
) -> Result<(Vec<f64>, Vec<String>)> {
    let trainable = classifier.trainable();
    let (losses, silent, _) = train_loop(
        classifier,
        &trainable,
        |c| loss(c, texts, labels),
        |c| c.adapter.as_mut(),
        steps,
        lr,
    )?;
    Ok((losses, silent))
}

/// The core of the training checks, for any model `T` holding an adapter.
pub(crate) fn train_loop<T>(
    model: &mut T,
    trainable: &[(String, Var)],
    loss: impl Fn(&T) -> Result<Tensor>,
    adapter: impl Fn(&mut T) -> &mut dyn graft_peft::Adapter,
    steps: usize,
    lr: f64,
) -> Result<(Vec<f64>, Vec<String>, AdamW)> {
    let vars: Vec<Var> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(
        vec![ParamGroup {
            vars,
            lr,
            weight_decay: 0.0,
        }],
        0.9,
        0.999,
        1e-8,
    )?;
    adapter(model).set_training(true);
    let mut losses = Vec::new();
    let mut silent = Vec::new();
    for step in 0..steps {
        let loss = loss(model)?;
        losses.push(scalar(&loss)?);
        let grads = loss.backward()?;
        silent.clear();
        for (name, var) in trainable {
            let nonzero = match grads.get(var.as_tensor()) {
                Some(g) => scalar(&g.abs()?.sum_all()?)? > 0.0,
                None => false,
            };
            if !nonzero {
                silent.push(name.clone());
            }
        }
        optimizer.step(&grads, 1.0)?;
        adapter(model).after_step(step + 1, &grads)?;
    }
    adapter(model).set_training(false);
    Ok((losses, silent, optimizer))
}
