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
    (precision, recall, f1(precision, recall))
}

/// The harmonic mean of `precision` and `recall`; 0 when both are.
fn f1(precision: f64, recall: f64) -> f64 {
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
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

/// Sequence tagging's scores: entity-level precision, recall and F1 over exact spans (an entity
/// counts when its first and last token and its type match, seqeval's default mode, micro
/// averaged over the sequences), and the accuracy over labelled tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaggingEvaluation {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub token_accuracy: f64,
    /// Entities in the gold tags, in the predicted tags, and in both.
    pub gold_entities: usize,
    pub predicted_entities: usize,
    pub correct_entities: usize,
}

/// Scores `predicted` tag sequences against `gold` ones, pairwise, only where the gold has a
/// tag: a prediction for a special token or padding (which have none) is ignored.
pub fn evaluate_tagging(
    gold: &[Vec<Option<graft_tokenizer::Tag>>],
    predicted: &[Vec<Option<graft_tokenizer::Tag>>],
) -> TaggingEvaluation {
    use std::collections::HashSet;
    let (mut gold_count, mut predicted_count, mut correct) = (0, 0, 0);
    let (mut tokens, mut right) = (0usize, 0usize);
    for (gold, predicted) in gold.iter().zip(predicted) {
        let predicted: Vec<_> = gold
            .iter()
            .zip(predicted)
            .map(|(g, p)| g.as_ref().and(p.clone()))
            .collect();
        let want: HashSet<_> = graft_tokenizer::entities(gold).into_iter().collect();
        let got: HashSet<_> = graft_tokenizer::entities(&predicted).into_iter().collect();
        gold_count += want.len();
        predicted_count += got.len();
        correct += want.intersection(&got).count();
        for (g, p) in gold.iter().zip(&predicted) {
            if let (Some(g), Some(p)) = (g, p) {
                tokens += 1;
                right += usize::from(g == p);
            }
        }
    }
    let precision = ratio(correct, predicted_count);
    let recall = ratio(correct, gold_count);
    TaggingEvaluation {
        precision,
        recall,
        f1: f1(precision, recall),
        token_accuracy: ratio(right, tokens),
        gold_entities: gold_count,
        predicted_entities: predicted_count,
        correct_entities: correct,
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
    /// seqeval's README example: `classification_report` gives MISC and PER, micro precision
    /// 0.50, recall 0.50, F1 0.50; token accuracy 0.80 (8 of 10 tags equal).
    #[test]
    fn tagging_is_scored_as_seqeval_scores_it() {
        let tags = |labels: &[&str]| -> Vec<Option<graft_tokenizer::Tag>> {
            labels
                .iter()
                .map(|l| graft_tokenizer::Tag::parse(l))
                .collect()
        };
        let gold = [
            tags(&["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"]),
            tags(&["B-PER", "I-PER", "O"]),
        ];
        let predicted = [
            tags(&["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"]),
            tags(&["B-PER", "I-PER", "O"]),
        ];
        let e = evaluate_tagging(&gold, &predicted);
        assert_eq!(
            (e.gold_entities, e.predicted_entities, e.correct_entities),
            (2, 2, 1)
        );
        assert!((e.f1 - 0.5).abs() < 1e-12);
        assert!(
            (e.token_accuracy - 0.8).abs() < 1e-12,
            "{}",
            e.token_accuracy
        );
        // A prediction where the gold has no tag (special tokens, padding) is not scored.
        let e = evaluate_tagging(
            &[vec![None, Some(graft_tokenizer::Tag::Outside)]],
            &[vec![
                Some(graft_tokenizer::Tag::Begin(String::new())),
                Some(graft_tokenizer::Tag::Outside),
            ]],
        );
        assert_eq!((e.token_accuracy, e.predicted_entities), (1.0, 0));
    }
}
