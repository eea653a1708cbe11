//! Losses over logits, from ops that all have a backward.
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{Tensor, D};

/// Mean cross-entropy of `logits` `[batch, classes]` against class ids `labels` `[batch]`,
/// from ops that all have a backward (log-softmax with a detached maximum).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    // In f32 for half-precision logits: a 49k-way log-sum-exp in bf16 loses the loss.
    let logits = &logits.to_dtype(ops::compute_dtype(logits.dtype()))?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Mean next-token cross-entropy of `logits` `[batch, seq, vocab]` against `labels`
/// `[batch, seq]` (i64: the id expected at each position, negative where no loss is taken).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let (rows, targets) = labelled_rows(labels, v)?;
    cross_entropy(
        &logits.reshape((b * t, v))?.index_select(&rows, 0)?,
        &targets,
    )
}

/// The flattened positions (`[n]`, into `[batch * seq]`) where `labels` `[batch, seq]` takes a
/// loss, and their target ids (`[n]`): a loss needs the head's logits at those rows only.
pub fn labelled_rows(labels: &Tensor, vocab: usize) -> Result<(Tensor, Tensor)> {
    let flat: Vec<i64> = labels.flatten_all()?.to_vec1::<i64>()?;
    let kept: Vec<u32> = (0..flat.len())
        .filter(|&i| flat[i] >= 0)
        .map(|i| i as u32)
        .collect();
    if kept.is_empty() {
        return Err(Error::InvalidConfig(
            "no position of the batch carries a label".into(),
        ));
    }
    let targets: Vec<u32> = kept.iter().map(|&i| flat[i as usize] as u32).collect();
    if let Some(bad) = targets.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::InvalidConfig(format!(
            "label id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let device = labels.device();
    let n = kept.len();
    Ok((
        Tensor::from_vec(kept, n, device)?,
        Tensor::from_vec(targets, n, device)?,
    ))
}
