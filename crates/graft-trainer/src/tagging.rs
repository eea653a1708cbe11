//! Sequence-tagging data: each row's text (a template over its columns) with the phrases of one
//! column marked in it as spans, then labelled per token. Every phrase that could not be
//! marked is counted and kept by row, for the run's report: none is dropped silently.
use crate::data::{DataError, Dataset};
use crate::keywords::parse_keywords;
use crate::{Error, Result};
use graft_tokenizer::{mark_phrases, tag_tokens, LabelSet, Span, Template, TextTokenizer};

/// One row's text and its marked spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedRow {
    /// The data file's row (header = 1).
    pub row: usize,
    pub text: String,
    pub spans: Vec<Span>,
}

/// The rows of a data set with their phrases marked, and what could not be marked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Marking {
    pub rows: Vec<TaggedRow>,
    /// Phrases read, over all rows (after dropping empty ones and repeats within a row).
    pub phrases: usize,
    /// `(row, phrase)` for each phrase marked nowhere in its row's text (absent, or only
    /// inside a longer phrase's span).
    pub unmatched: Vec<(usize, String)>,
}

impl Marking {
    /// Rows where not one phrase was marked (they still train, as all `O`).
    pub fn rows_without_spans(&self) -> usize {
        self.rows.iter().filter(|r| r.spans.is_empty()).count()
    }
}

/// Marks each row's phrases (column `column`, separated by semicolons, or by commas in a row
/// without one, as the challenge writes keywords) in the text `template` renders, as spans of
/// type `kind` ([`mark_phrases`]: case-insensitive, on word boundaries, longest first).
pub fn mark_rows(
    dataset: &Dataset,
    template: &Template,
    column: &str,
    kind: &str,
) -> std::result::Result<Marking, DataError> {
    let index = dataset
        .column_index(column)
        .ok_or_else(|| DataError::MissingColumn {
            path: dataset.path.clone(),
            column: column.to_string(),
            columns: dataset.columns.clone(),
        })?;
    let texts = dataset.texts(template)?;
    let mut marking = Marking::default();
    for (record, text) in dataset.records.iter().zip(texts) {
        let phrases = parse_keywords(&record.fields[index]);
        let marked = mark_phrases(&text, &phrases, kind);
        marking.phrases += phrases.len();
        marking.unmatched.extend(
            marked
                .unmatched
                .into_iter()
                .map(|phrase| (record.row, phrase)),
        );
        marking.rows.push(TaggedRow {
            row: record.row,
            text,
            spans: marked.spans,
        });
    }
    Ok(marking)
}

/// A row tokenized for training: token ids, and per token the label's index in `labels`, or
/// -100 where no loss is taken (special tokens); `cut` counts the spans that truncation
/// removed wholly or in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledTokens {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub cut: usize,
}

/// No loss at this token (transformers' and PyTorch's ignore index).
pub const IGNORED: i64 = -100;

/// Tokenizes `row` and labels its tokens from its spans ([`tag_tokens`]: B on a span's first
/// token, I on the rest, O elsewhere); each tag must be one of `labels` (e.g. `O`, `B`, `I`).
pub fn label_tokens(
    tokenizer: &TextTokenizer,
    labels: &LabelSet,
    row: &TaggedRow,
) -> Result<LabelledTokens> {
    let (ids, offsets) = tokenizer.encode_with_offsets(&row.text)?;
    let tags = tag_tokens(&offsets, &row.spans);
    let mut indices = Vec::with_capacity(tags.len());
    for tag in &tags {
        let Some(tag) = tag else {
            indices.push(IGNORED);
            continue;
        };
        let label = tag.label();
        let index = labels.index_of(&label).ok_or_else(|| {
            Error::Config(format!(
                "row {}: the tag {label:?} is not one of data.labels {:?}; a tagging task \
                 needs O, B and I (or B-TYPE and I-TYPE for each span type)",
                row.row,
                labels.labels()
            ))
        })?;
        indices.push(index as i64);
    }
    let covered = offsets.iter().flatten().map(|&(_, end)| end).max();
    let cut = row
        .spans
        .iter()
        .filter(|s| covered.is_none_or(|end| s.end > end))
        .count();
    Ok(LabelledTokens {
        ids,
        labels: indices,
        cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(csv: &str) -> Dataset {
        Dataset::parse_csv(std::path::Path::new("t.csv"), csv.as_bytes(), &[]).unwrap()
    }

    #[test]
    fn phrases_are_marked_per_row_and_the_unmatched_are_kept_by_row() {
        let data = dataset(
            "title,abstract,Keywords\n\
             Graphene oxide,We study graphene oxide films.,graphene oxide; films; sensors\n\
             Deep nets,Nothing here.,transformers\n",
        );
        let template = Template::parse("{title}\n{abstract}").unwrap();
        let marking = mark_rows(&data, &template, "Keywords", "").unwrap();
        let texts: Vec<Vec<&str>> = marking
            .rows
            .iter()
            .map(|r| r.spans.iter().map(|s| &r.text[s.start..s.end]).collect())
            .collect();
        assert_eq!(
            texts,
            [vec!["Graphene oxide", "graphene oxide", "films"], vec![]]
        );
        assert_eq!(marking.phrases, 4);
        assert_eq!(
            marking.unmatched,
            [(2, "sensors".to_string()), (3, "transformers".to_string())]
        );
        assert_eq!(marking.rows_without_spans(), 1);
        let e = mark_rows(&data, &template, "keywords", "").unwrap_err();
        assert!(e.to_string().contains("\"keywords\" not found"), "{e}");
    }
}
