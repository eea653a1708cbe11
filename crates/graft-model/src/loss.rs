//! Losses over logits, from ops that all have a backward.
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{Device, Tensor, D};

/// Mean cross-entropy of `logits` `[batch, classes]` against class ids `labels` `[batch]`,
/// from ops that all have a backward (log-softmax with a detached maximum).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    // In f32 for half-precision logits: a 49k-way log-sum-exp in bf16 loses the loss.
    let logits = &logits.to_dtype(ops::compute_dtype(logits.dtype()))?;
    let max = logits.max_keepdim(D::Minus1)?;
    // A constant: no logits-sized gradient of the maximum kept to the backward's end.
    let shifted = ops::reference::with_constant(logits, &max, ops::reference::ConstantOp::Sub)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Mean next-token cross-entropy of `logits` `[batch, seq, vocab]` against `labels` (the id
/// expected at each position, row-major over `[batch, seq]`, negative where no loss is taken).
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let (rows, targets) = labelled_rows(labels, b * t, v, logits.device())?;
    cross_entropy(
        &logits.reshape((b * t, v))?.index_select(&rows, 0)?,
        &targets,
    )
}

/// The flattened positions (`[n]`, into `positions` = batch * seq) where `labels` (one per
/// position, row-major) takes a loss, and their target ids (`[n]`): a loss needs the head's
/// logits at those rows only. Both are made from the host's labels and uploaded once, so that
/// no step reads its labels back from the device.
pub fn labelled_rows(
    labels: &[i64],
    positions: usize,
    vocab: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if labels.len() != positions {
        return Err(Error::InvalidConfig(format!(
            "{} labels for a batch of {positions} positions",
            labels.len()
        )));
    }
    let (kept, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .filter(|(_, &id)| id >= 0)
        .map(|(i, &id)| u32::try_from(id).map(|id| (i as u32, id)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::InvalidConfig("a label id does not fit 32 bits".into()))?;
    if kept.is_empty() {
        return Err(Error::InvalidConfig(
            "no position of the batch carries a label".into(),
        ));
    }
    if let Some(bad) = targets.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::InvalidConfig(format!(
            "label id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let n = kept.len();
    Ok((
        Tensor::from_vec(kept, n, device)?,
        Tensor::from_vec(targets, n, device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The loss is the mean of −log softmax at the labelled positions (computed here on the
    /// host); labels of the wrong count, with no labelled position or outside the vocabulary
    /// are refused.
    #[test]
    fn causal_loss_takes_the_labelled_positions_of_host_labels() {
        let mut rng = crate::init::seeded_rng(9);
        let logits =
            crate::init::normal(&mut rng, &[2, 3, 4], 2.0, DType::F64, &Device::Cpu).unwrap();
        let labels = [1, -100, 3, -100, 0, 2];
        let rows = logits.reshape((6, 4)).unwrap().to_vec2::<f64>().unwrap();
        let nll: Vec<f64> = labels
            .iter()
            .zip(&rows)
            .filter(|(&l, _)| l >= 0)
            .map(|(&l, row)| row.iter().map(|x| x.exp()).sum::<f64>().ln() - row[l as usize])
            .collect();
        let expected = nll.iter().sum::<f64>() / nll.len() as f64;
        let loss = causal_lm_loss(&logits, &labels)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");
        assert!(causal_lm_loss(&logits, &labels[..5]).is_err());
        assert!(causal_lm_loss(&logits, &[-100; 6]).is_err());
        assert!(causal_lm_loss(&logits, &[4, -100, -100, -100, -100, -100]).is_err());
    }
}
