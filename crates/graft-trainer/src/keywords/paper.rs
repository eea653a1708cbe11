//! A paper as keyword extraction sees it, the extractor trait, the report split and the
//! keyword list's text form.
use super::score;
use crate::data::{DataError, Dataset, Record};
use crate::Result;

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
