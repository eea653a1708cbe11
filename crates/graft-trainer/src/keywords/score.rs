//! Keyword scores: exact-match F1 over normalised keyword sets, and partial-match F1 over the
//! sets of words the keywords hold, each computed per paper and averaged over papers (macro).
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// A keyword as compared: lower case, hyphens and dashes as spaces, runs of whitespace as one
/// space, no surrounding punctuation. "Dye-sensitized  solar cells." and "dye sensitized solar
/// cells" are one keyword.
pub fn normalise(keyword: &str) -> String {
    let spaced: String = keyword
        .chars()
        .map(|c| match c {
            '-' | '\u{2010}'..='\u{2015}' => ' ',
            c => c,
        })
        .flat_map(char::to_lowercase)
        .collect();
    let words: Vec<&str> = spaced.split_whitespace().collect();
    words
        .join(" ")
        .trim_matches(|c: char| c.is_ascii_punctuation() && !matches!(c, ')' | ']' | '('))
        .to_string()
}

/// The words of a normalised keyword, for partial matching: split at whitespace and at
/// punctuation.
fn words(keyword: &str) -> impl Iterator<Item = &str> {
    keyword
        .split(|c: char| c.is_whitespace() || (c.is_ascii_punctuation() && c != '\''))
        .filter(|w| !w.is_empty())
}

/// F1 of a predicted set against a gold set: 0 when either is empty (nothing can match).
fn f1(predicted: &HashSet<String>, gold: &HashSet<String>) -> f64 {
    let hits = predicted.intersection(gold).count() as f64;
    if hits == 0.0 {
        return 0.0;
    }
    let precision = hits / predicted.len() as f64;
    let recall = hits / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// One paper's two figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaperScore {
    pub exact_f1: f64,
    pub partial_f1: f64,
}

pub fn score_paper(predicted: &[String], gold: &[String]) -> PaperScore {
    let set = |keywords: &[String]| -> HashSet<String> {
        keywords
            .iter()
            .map(|k| normalise(k))
            .filter(|k| !k.is_empty())
            .collect()
    };
    let (predicted, gold) = (set(predicted), set(gold));
    let word_set = |keywords: &HashSet<String>| -> HashSet<String> {
        keywords
            .iter()
            .flat_map(|k| words(k).map(str::to_string))
            .collect()
    };
    PaperScore {
        exact_f1: f1(&predicted, &gold),
        partial_f1: f1(&word_set(&predicted), &word_set(&gold)),
    }
}

/// The macro averages over papers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeywordScores {
    pub papers: usize,
    pub exact_f1: f64,
    pub partial_f1: f64,
    /// Mean number of keywords predicted and in the gold lists.
    pub mean_predicted: f64,
    pub mean_gold: f64,
}

/// Scores `predicted[i]` against `gold[i]` for every paper.
///
/// # Panics
/// When the two lists differ in length (a caller's bug, not a data error).
pub fn score(predicted: &[Vec<String>], gold: &[Vec<String>]) -> KeywordScores {
    assert_eq!(predicted.len(), gold.len(), "one prediction per gold list");
    let papers = gold.len();
    let mean = |sum: f64| {
        if papers == 0 {
            0.0
        } else {
            sum / papers as f64
        }
    };
    let per_paper: Vec<PaperScore> = predicted
        .iter()
        .zip(gold)
        .map(|(p, g)| score_paper(p, g))
        .collect();
    KeywordScores {
        papers,
        exact_f1: mean(per_paper.iter().map(|s| s.exact_f1).sum()),
        partial_f1: mean(per_paper.iter().map(|s| s.partial_f1).sum()),
        mean_predicted: mean(predicted.iter().map(|p| p.len() as f64).sum()),
        mean_gold: mean(gold.iter().map(|g| g.len() as f64).sum()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(text: &str) -> Vec<String> {
        crate::keywords::parse_keywords(text)
    }

    #[test]
    fn normalisation_ignores_case_whitespace_hyphens_and_a_final_stop() {
        assert_eq!(
            normalise("  Dye-Sensitized\tsolar   cells. "),
            "dye sensitized solar cells"
        );
        assert_eq!(normalise("CM-H2DCFDA"), "cm h2dcfda");
        assert_eq!(normalise("MPPT (maximum power)"), "mppt (maximum power)");
        assert_eq!(normalise("non\u{2013}linear"), "non linear");
    }

    #[test]
    fn figures_by_hand() {
        // Exact: 2 of 3 predicted are gold, 2 of 4 gold found: P 2/3, R 1/2, F1 4/7.
        let s = score_paper(
            &list("flow cytometry; Leukemia; oxidative stress"),
            &list("Flow-cytometry; HDACi; leukemia; ROS."),
        );
        assert!((s.exact_f1 - 4.0 / 7.0).abs() < 1e-12, "{s:?}");
        // Partial, over words: predicted {flow, cytometry, leukemia, oxidative, stress}, gold
        // {flow, cytometry, hdaci, leukemia, ros}: 3 shared, P 3/5, R 3/5.
        assert!((s.partial_f1 - 0.6).abs() < 1e-12, "{s:?}");
        let none = score_paper(&[], &list("a; b"));
        assert_eq!((none.exact_f1, none.partial_f1), (0.0, 0.0));
        let scores = score(&[list("a; b"), list("c")], &[list("a; b"), list("d")]);
        assert_eq!(scores.papers, 2);
        assert!((scores.exact_f1 - 0.5).abs() < 1e-12);
        assert!((scores.mean_predicted - 1.5).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn scores_are_in_unit_range_perfect_on_gold_and_blind_to_order(
            gold in proptest::collection::vec("[a-zA-Z -]{1,12}", 1..6),
            predicted in proptest::collection::vec("[a-zA-Z -]{1,12}", 0..6),
        ) {
            let s = score_paper(&predicted, &gold);
            prop_assert!((0.0..=1.0).contains(&s.exact_f1));
            prop_assert!((0.0..=1.0).contains(&s.partial_f1));
            let mut reversed = predicted.clone();
            reversed.reverse();
            prop_assert_eq!(score_paper(&reversed, &gold), s);
            if gold.iter().any(|g| !normalise(g).is_empty()) {
                let perfect = score_paper(&gold, &gold);
                prop_assert_eq!((perfect.exact_f1, perfect.partial_f1), (1.0, 1.0));
            }
        }
    }
}
