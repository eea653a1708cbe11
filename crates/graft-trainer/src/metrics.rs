//! Classification metrics. With two classes, precision, recall and F1 are those of class 1
//! (the challenge's positive class, "medical"); with more, their macro average.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
    pub count: usize,
    /// JSON has no NaN: a diverged run's NaN loss is written as null, and read back as NaN.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn class_scores(confusion: &[Vec<usize>], class: usize) -> (f64, f64, f64) {
    let tp = confusion[class][class];
    let predicted: usize = confusion.iter().map(|row| row[class]).sum();
    let actual: usize = confusion[class].iter().sum();
    let precision = ratio(tp, predicted);
    let recall = ratio(tp, actual);
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    (precision, recall, f1)
}

pub fn evaluate(truth: &[usize], predicted: &[usize], num_classes: usize, loss: f64) -> Evaluation {
    let mut confusion = vec![vec![0usize; num_classes]; num_classes];
    for (&t, &p) in truth.iter().zip(predicted) {
        if t < num_classes && p < num_classes {
            confusion[t][p] += 1;
        }
    }
    let correct: usize = (0..num_classes).map(|c| confusion[c][c]).sum();
    let (precision, recall, f1) = if num_classes == 2 {
        class_scores(&confusion, 1)
    } else {
        let scores: Vec<_> = (0..num_classes)
            .map(|c| class_scores(&confusion, c))
            .collect();
        let n = num_classes as f64;
        (
            scores.iter().map(|s| s.0).sum::<f64>() / n,
            scores.iter().map(|s| s.1).sum::<f64>() / n,
            scores.iter().map(|s| s.2).sum::<f64>() / n,
        )
    };
    Evaluation {
        accuracy: ratio(correct, truth.len()),
        precision,
        recall,
        f1,
        confusion,
        count: truth.len(),
        loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_scores_are_those_of_class_one() {
        // truth:     1 1 1 0 0
        // predicted: 1 0 1 1 0  -> tp 2, fp 1, fn 1
        let e = evaluate(&[1, 1, 1, 0, 0], &[1, 0, 1, 1, 0], 2, 0.0);
        assert_eq!(e.confusion, vec![vec![1, 1], vec![1, 2]]);
        assert!((e.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.accuracy - 0.6).abs() < 1e-12);
    }

    #[test]
    fn no_positive_prediction_gives_zero_not_nan() {
        let e = evaluate(&[1, 0], &[0, 0], 2, 0.0);
        assert_eq!(e.precision, 0.0);
        assert_eq!(e.f1, 0.0);
    }
}
