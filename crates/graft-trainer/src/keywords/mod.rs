//! Task 2 of the challenge: a paper's keywords. Extractors share one trait
//! ([`KeywordExtractor`]); [`score`] compares them with gold keywords; the report split
//! ([`is_report_row`]) keeps the rows they are scored on out of every training set.
pub mod generative;
pub mod score;
pub mod statistical;

use crate::data::{DataError, Dataset, Record};
use crate::Result;

pub use generative::GenerativeExtractor;
pub use score::{score, KeywordScores};
pub use statistical::{StatisticalExtractor, StatisticalSettings};

/// Rows of `challenge_test.csv` whose 0-based index is a multiple of this are the report rows:
/// keyword figures are measured on them, and no extractor is trained on them.
pub const REPORT_EVERY: usize = 5;

/// Whether the row at 0-based `index` is a report row of a split that holds out every
/// `every`-th row (0: no row is held out).
pub fn is_report_row(index: usize, every: usize) -> bool {
    every > 0 && index.is_multiple_of(every)
}

/// One paper: the columns of a data row, read by name.
#[derive(Debug, Clone, Copy)]
pub struct Paper<'a> {
    columns: &'a [String],
    fields: &'a [String],
}

impl<'a> Paper<'a> {
    /// `fields` in the order of `columns`.
    pub fn new(columns: &'a [String], fields: &'a [String]) -> Self {
        Self { columns, fields }
    }

    /// A data row of `dataset`.
    pub fn of(dataset: &'a Dataset, record: &'a Record) -> Self {
        Self::new(&dataset.columns, &record.fields)
    }

    /// The value of `column`, `None` when the row has no such column.
    pub fn field(&self, column: &str) -> Option<&'a str> {
        let index = self.columns.iter().position(|c| c == column)?;
        self.fields.get(index).map(String::as_str)
    }

    pub fn title(&self) -> &'a str {
        self.field("title").unwrap_or("")
    }

    pub fn abstract_text(&self) -> &'a str {
        self.field("abstract").unwrap_or("")
    }
}

/// Something that gives a paper's keywords, best first.
pub trait KeywordExtractor {
    /// A short name for reports (`statistical`, `generative`).
    fn name(&self) -> &str;
    fn extract(&self, paper: &Paper) -> Result<Vec<String>>;
}

/// A keyword list as the challenge writes it: separated by semicolons (by commas in the few
/// rows that have no semicolon), the last one often ending in a full stop. Empty entries and
/// repeats (after [`score::normalise`]) are dropped; the first spelling is kept.
pub fn parse_keywords(text: &str) -> Vec<String> {
    let separator = if text.contains(';') { ';' } else { ',' };
    let mut seen = std::collections::HashSet::new();
    text.split(separator)
        .map(|k| k.trim().trim_end_matches('.').trim())
        .filter(|k| !k.is_empty() && seen.insert(score::normalise(k)))
        .map(str::to_string)
        .collect()
}

/// The challenge's spelling of a keyword list: `kw1; kw2; kw3`.
pub fn format_keywords(keywords: &[String]) -> String {
    keywords.join("; ")
}

/// Reads a CSV of papers: `title` and `abstract` are required.
pub fn read_papers(path: &std::path::Path) -> std::result::Result<Dataset, DataError> {
    Dataset::read_csv(path, &["title", "abstract"])
}

/// Uses `primary`, and `fallback` for a paper `primary` finds no keyword in (a submission
/// needs at least one); counts how often that happened.
pub struct WithFallback<'e> {
    pub primary: &'e dyn KeywordExtractor,
    pub fallback: &'e dyn KeywordExtractor,
    fell_back: std::cell::Cell<usize>,
}

impl<'e> WithFallback<'e> {
    pub fn new(primary: &'e dyn KeywordExtractor, fallback: &'e dyn KeywordExtractor) -> Self {
        Self {
            primary,
            fallback,
            fell_back: std::cell::Cell::new(0),
        }
    }

    /// How many papers took the fallback's keywords.
    pub fn fell_back(&self) -> usize {
        self.fell_back.get()
    }
}

impl KeywordExtractor for WithFallback<'_> {
    fn name(&self) -> &str {
        self.primary.name()
    }

    fn extract(&self, paper: &Paper) -> Result<Vec<String>> {
        let keywords = self.primary.extract(paper)?;
        if !keywords.is_empty() {
            return Ok(keywords);
        }
        self.fell_back.set(self.fell_back.get() + 1);
        self.fallback.extract(paper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_lists_split_on_semicolons_then_commas_and_lose_the_final_stop() {
        assert_eq!(
            parse_keywords("Flow cytometry; HDACi; Leukemia; ROS."),
            ["Flow cytometry", "HDACi", "Leukemia", "ROS"]
        );
        assert_eq!(
            parse_keywords("rubella, Congenital Rubella Syndrome, Vietnam."),
            ["rubella", "Congenital Rubella Syndrome", "Vietnam"]
        );
        // A comma inside a semicolon list belongs to its keyword.
        assert_eq!(parse_keywords("a, b; c"), ["a, b", "c"]);
        // Repeats after normalisation and empty entries go.
        assert_eq!(
            parse_keywords("Shiny; shiny ; ; web-application; Web application"),
            ["Shiny", "web-application"]
        );
        assert!(parse_keywords(" ; . ").is_empty());
        assert_eq!(
            format_keywords(&parse_keywords("x; y.")),
            "x; y",
            "format and parse round-trip"
        );
    }

    #[test]
    fn the_report_split_holds_out_every_fifth_row_from_the_first() {
        let report: Vec<usize> = (0..12).filter(|&i| is_report_row(i, 5)).collect();
        assert_eq!(report, [0, 5, 10]);
        assert!(!(0..12).any(|i| is_report_row(i, 0)));
        assert_eq!(
            (0..2358)
                .filter(|&i| is_report_row(i, REPORT_EVERY))
                .count(),
            472
        );
    }

    struct Fixed(Vec<String>);
    impl KeywordExtractor for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn extract(&self, _: &Paper) -> Result<Vec<String>> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn the_fallback_answers_only_where_the_primary_found_nothing() {
        let (columns, fields) = (vec!["title".to_string()], vec!["t".to_string()]);
        let paper = Paper::new(&columns, &fields);
        let (empty, some, other) = (
            Fixed(vec![]),
            Fixed(vec!["a".into()]),
            Fixed(vec!["b".into()]),
        );
        let both = WithFallback::new(&some, &other);
        assert_eq!(both.extract(&paper).unwrap(), ["a"]);
        assert_eq!(both.fell_back(), 0);
        let both = WithFallback::new(&empty, &other);
        assert_eq!(both.extract(&paper).unwrap(), ["b"]);
        assert_eq!(both.fell_back(), 1);
        assert_eq!(paper.title(), "t");
        assert_eq!(paper.abstract_text(), "");
    }
}
