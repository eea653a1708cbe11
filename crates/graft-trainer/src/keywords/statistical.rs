//! The unsupervised baseline: TF-IDF over candidate phrases, needing no training.
//!
//! Candidates are the runs of words between punctuation and stop words (RAKE's cut), and every
//! phrase of up to `max_words` words inside a run. A phrase scores its count in the paper
//! (title and abstract) times the sum of its words' inverse document frequencies, counted over
//! the papers the extractor was fitted on; phrases in the title count `title_boost` times more.
//! The best are taken in order, skipping any that contains or is contained in one already taken.
use super::{KeywordExtractor, Paper};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatisticalSettings {
    /// Keywords per paper (the challenge's gold lists hold 5.8 on average).
    pub top_k: usize,
    /// The longest candidate phrase, in words.
    pub max_words: usize,
    /// A phrase that occurs in the title scores this many times more.
    pub title_boost: f64,
}

impl Default for StatisticalSettings {
    fn default() -> Self {
        Self {
            top_k: 5,
            max_words: 3,
            title_boost: 2.0,
        }
    }
}

/// Function words and the verbs and nouns of any abstract: never part of a keyword.
#[rustfmt::skip]
const STOP_WORDS: &[&str] = &[
    "a", "about", "above", "according", "across", "after", "against", "all", "almost", "along",
    "also", "although", "among", "an", "analysis", "and", "another", "any", "approach", "are", "as",
    "at", "based", "be", "been", "before", "being", "between", "both", "but", "by", "can",
    "compared", "conclusion", "conclusions", "could", "data", "demonstrate", "demonstrated",
    "describe", "described", "despite", "did", "different", "do", "does", "due", "during", "each",
    "either", "especially", "et", "etc", "even", "every", "finally", "first", "for", "found",
    "from", "further", "furthermore", "had", "has", "have", "having", "here", "high", "higher",
    "how", "however", "i", "if", "in", "including", "increased", "into", "is", "it", "its",
    "itself", "less", "low", "lower", "many", "may", "method", "methods", "might", "more", "most",
    "much", "must", "new", "no", "nor", "not", "novel", "objective", "obtained", "of", "on", "one",
    "only", "or", "other", "our", "out", "over", "paper", "per", "performed", "present",
    "presented", "previous", "propose", "proposed", "provide", "provides", "rather", "respectively",
    "result", "results", "revealed", "second", "several", "shall", "should", "show", "showed",
    "shown", "shows", "significant", "significantly", "similar", "since", "so", "some", "studied",
    "studies", "study", "such", "than", "that", "the", "their", "them", "then", "there", "these",
    "they", "this", "those", "three", "through", "thus", "to", "total", "two", "under", "up",
    "upon", "use", "used", "uses", "using", "various", "very", "via", "was", "we", "well", "were",
    "what", "when", "where", "whether", "which", "while", "who", "whose", "why", "will", "with",
    "within", "without", "work", "would", "yet", "you",
];

/// A word or a cut between phrases.
#[derive(Debug, PartialEq)]
enum Piece<'t> {
    Word(&'t str),
    Cut,
}

/// Splits text into words (letters, digits and inner hyphens or apostrophes) and cuts
/// (punctuation, stop words, numbers, single letters).
fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut word_start = None;
    // A space after the end closes the last word.
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        if c.is_alphanumeric() || c == '-' || c == '\'' {
            word_start.get_or_insert(i);
            continue;
        }
        if let Some(start) = word_start.take() {
            out.push(word_or_cut(&text[start..i]));
        }
        if !c.is_whitespace() {
            out.push(Piece::Cut);
        }
    }
    out
}

fn word_or_cut(word: &str) -> Piece<'_> {
    let word = word.trim_matches(|c| c == '-' || c == '\'');
    let keep = word.chars().count() > 1
        && word.chars().any(char::is_alphabetic)
        && STOP_WORDS
            .binary_search(&word.to_lowercase().as_str())
            .is_err();
    if keep {
        Piece::Word(word)
    } else {
        Piece::Cut
    }
}

/// The runs of words between cuts.
fn runs<'t>(pieces: &[Piece<'t>]) -> Vec<Vec<&'t str>> {
    pieces
        .split(|p| *p == Piece::Cut)
        .filter(|run| !run.is_empty())
        .map(|run| {
            run.iter()
                .map(|p| match p {
                    Piece::Word(w) => *w,
                    Piece::Cut => unreachable!("split at cuts"),
                })
                .collect()
        })
        .collect()
}

/// One candidate phrase of a paper.
struct Candidate<'t> {
    /// The first spelling seen.
    surface: Vec<&'t str>,
    count: usize,
    in_title: bool,
}

pub struct StatisticalExtractor {
    settings: StatisticalSettings,
    papers: usize,
    /// In how many of the fitted papers each lower-case word occurs.
    document_frequency: HashMap<String, usize>,
}

impl StatisticalExtractor {
    /// Counts word document frequencies over `papers` (their titles and abstracts; no keyword
    /// is read).
    pub fn fit<'p>(
        papers: impl IntoIterator<Item = Paper<'p>>,
        settings: StatisticalSettings,
    ) -> Self {
        let mut document_frequency: HashMap<String, usize> = HashMap::new();
        let mut count = 0;
        for paper in papers {
            count += 1;
            let mut seen = std::collections::HashSet::new();
            for text in [paper.title(), paper.abstract_text()] {
                for piece in pieces(text) {
                    if let Piece::Word(w) = piece {
                        seen.insert(w.to_lowercase());
                    }
                }
            }
            for word in seen {
                *document_frequency.entry(word).or_default() += 1;
            }
        }
        Self {
            settings,
            papers: count,
            document_frequency,
        }
    }

    fn idf(&self, word: &str) -> f64 {
        let df = self.document_frequency.get(word).copied().unwrap_or(0);
        ((1 + self.papers) as f64 / (1 + df) as f64).ln() + 1.0
    }
}

impl KeywordExtractor for StatisticalExtractor {
    fn name(&self) -> &str {
        "statistical"
    }

    fn extract(&self, paper: &Paper) -> Result<Vec<String>> {
        let mut candidates: Vec<(String, Candidate)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (text, in_title) in [(paper.title(), true), (paper.abstract_text(), false)] {
            for run in runs(&pieces(text)) {
                for len in 1..=self.settings.max_words.min(run.len()) {
                    for phrase in run.windows(len) {
                        let key = phrase
                            .iter()
                            .map(|w| w.to_lowercase())
                            .collect::<Vec<_>>()
                            .join(" ");
                        let slot = *index.entry(key.clone()).or_insert_with(|| {
                            candidates.push((
                                key,
                                Candidate {
                                    surface: phrase.to_vec(),
                                    count: 0,
                                    in_title: false,
                                },
                            ));
                            candidates.len() - 1
                        });
                        let candidate = &mut candidates[slot].1;
                        candidate.count += 1;
                        candidate.in_title |= in_title;
                    }
                }
            }
        }
        let mut scored: Vec<(f64, usize)> = candidates
            .iter()
            .enumerate()
            .map(|(i, (key, c))| {
                let idf: f64 = key.split(' ').map(|w| self.idf(w)).sum();
                let boost = if c.in_title {
                    self.settings.title_boost
                } else {
                    1.0
                };
                (c.count as f64 * idf * boost, i)
            })
            .collect();
        // Best first; ties keep the order of first appearance.
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut chosen: Vec<&str> = Vec::new();
        let mut keywords = Vec::new();
        for (_, i) in scored {
            if keywords.len() == self.settings.top_k {
                break;
            }
            let (key, candidate) = &candidates[i];
            let overlaps = chosen
                .iter()
                .any(|c| contains_words(c, key) || contains_words(key, c));
            if !overlaps {
                chosen.push(key);
                keywords.push(candidate.surface.join(" "));
            }
        }
        Ok(keywords)
    }
}

/// Whether the words of `inner` occur in a row in `outer` (both lower-case, space-separated).
fn contains_words(outer: &str, inner: &str) -> bool {
    format!(" {outer} ").contains(&format!(" {inner} "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_word_list_is_sorted_for_binary_search() {
        assert!(STOP_WORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn phrases_are_cut_at_punctuation_stop_words_and_numbers() {
        let runs = runs(&pieces(
            "Reactive oxygen species (ROS) are induced by 12 chemo-therapeutics, in vital cells.",
        ));
        assert_eq!(
            runs,
            vec![
                vec!["Reactive", "oxygen", "species"],
                vec!["ROS"],
                vec!["induced"],
                vec!["chemo-therapeutics"],
                vec!["vital", "cells"],
            ]
        );
    }

    fn paper(title: &str, abstract_text: &str) -> (Vec<String>, Vec<String>) {
        (
            vec!["title".into(), "abstract".into()],
            vec![title.into(), abstract_text.into()],
        )
    }

    #[test]
    fn a_repeated_rare_phrase_beats_common_words_and_overlaps_are_skipped() {
        let corpus = [
            paper("Cells in culture", "The cells grow in a new medium."),
            paper("Growth of cells", "We measure cells and their growth."),
            paper(
                "Histone deacetylase inhibitors in leukemia",
                "Histone deacetylase inhibitors change cells. Histone deacetylase inhibitors \
                 act on leukemia cells.",
            ),
        ];
        let papers: Vec<Paper> = corpus.iter().map(|(c, f)| Paper::new(c, f)).collect();
        let extractor = StatisticalExtractor::fit(
            papers.iter().copied(),
            StatisticalSettings {
                top_k: 2,
                ..Default::default()
            },
        );
        let keywords = extractor.extract(&papers[2]).unwrap();
        assert_eq!(
            keywords,
            ["Histone deacetylase inhibitors", "leukemia"],
            "the three-word phrase scores highest; its sub-phrases are skipped; `cells` is in \
             every paper"
        );
        let (c, f) = paper("", "");
        assert!(extractor.extract(&Paper::new(&c, &f)).unwrap().is_empty());
    }
}
