//! Labelled CSV data (the challenge's `uuid,title,author,abstract,Keywords,label` columns) and a
//! seeded stratified train/validation split.
//!
//! Rows are numbered as records with the header as row 1, so the first data record is row 2;
//! a record with a multi-line quoted field is still one row. Line numbers are given as well,
//! because editors show lines.

use std::path::{Path, PathBuf};

use graft_tokenizer::{LabelSet, Template};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Errors from reading and splitting data sets.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("data file {path} is empty (0 bytes): expected a CSV header row and data rows")]
    EmptyFile { path: PathBuf },

    #[error("data file {path} holds only blank lines: expected a CSV header row and data rows")]
    NoHeader { path: PathBuf },

    #[error(
        "data file {path} has a header row but no data rows: expected at least one record after \
         the header {}",
        quoted_list(.columns)
    )]
    NoDataRows { path: PathBuf, columns: Vec<String> },

    #[error(
        "{path}: row 1 (header): required column {column:?} not found; the header has {}",
        quoted_list(.columns)
    )]
    MissingColumn {
        path: PathBuf,
        column: String,
        columns: Vec<String>,
    },

    #[error(
        "{path}: row 1 (header): column name {column:?} appears twice, as columns {first} and \
         {second}; expected distinct column names"
    )]
    DuplicateColumn {
        path: PathBuf,
        column: String,
        first: usize,
        second: usize,
    },

    #[error(
        "{path}: row {row} (line {line}): expected {expected} fields (as in the header), \
         found {found}"
    )]
    RaggedRow {
        path: PathBuf,
        row: usize,
        line: u64,
        expected: usize,
        found: usize,
    },

    #[error(
        "{path}: row {row} (lines {line}-{end_line}): expected {expected} fields (as in the \
         header), found {found}; the row spans several lines inside a quoted field opened on \
         line {quote_line} in {column}, so row {row} probably has an unbalanced quote"
    )]
    ProbablyUnbalancedQuote {
        path: PathBuf,
        row: usize,
        line: u64,
        end_line: u64,
        quote_line: u64,
        column: String,
        expected: usize,
        found: usize,
    },

    #[error(
        "{path}: row {row} (line {line}): the quoted field opened on line {quote_line} in \
         {column} is never closed (expected a closing `\"`, found the end of the file), so \
         row {row} probably has an unbalanced quote"
    )]
    UnclosedQuote {
        path: PathBuf,
        row: usize,
        line: u64,
        quote_line: u64,
        column: String,
    },

    #[error(
        "{path}: row {row} (line {line}), {column}: expected a comma or the end of the line \
         after the quoted field opened on line {quote_line} and closed on line {close_line}, \
         found `{found}`; a quote inside a quoted field must be doubled (\"\"), so row {row} \
         probably has an unbalanced or undoubled quote"
    )]
    TextAfterQuote {
        path: PathBuf,
        row: usize,
        line: u64,
        quote_line: u64,
        close_line: u64,
        column: String,
        found: String,
    },

    #[error("{path}: row {row}: cannot parse CSV: {source}")]
    Csv {
        path: PathBuf,
        row: usize,
        #[source]
        source: csv::Error,
    },

    #[error(
        "{path}: row {row} (line {line}), {column}: expected UTF-8 text, found an invalid byte \
         sequence after {valid_up_to} valid bytes of the field"
    )]
    NonUtf8 {
        path: PathBuf,
        row: usize,
        line: u64,
        column: String,
        valid_up_to: usize,
    },

    #[error("{path}: {source}")]
    Template {
        path: PathBuf,
        #[source]
        source: graft_tokenizer::Error,
    },

    #[error("{path}: row {row}: {source}")]
    Render {
        path: PathBuf,
        row: usize,
        #[source]
        source: graft_tokenizer::Error,
    },

    #[error(
        "{path}: row {row} (uuid {uuid:?}): expected some text, found the template's columns {} \
         all empty",
        quoted_list(.columns)
    )]
    EmptyText {
        path: PathBuf,
        row: usize,
        uuid: String,
        columns: Vec<String>,
    },

    #[error(
        "{path}: row {row}, column {column:?}: expected one of the labels {}, found {value:?}",
        quoted_list(.allowed)
    )]
    UnknownLabel {
        path: PathBuf,
        row: usize,
        column: String,
        value: String,
        allowed: Vec<String>,
    },

    #[error(
        "{path}: row {row}, {column}: the field is {bytes} bytes, more than the {limit} \
         bytes graft reads per field (the model sees at most max_len tokens anyway); is a quote \
         left open, or is this the wrong file?"
    )]
    FieldTooLong {
        path: PathBuf,
        row: usize,
        column: String,
        bytes: usize,
        limit: usize,
    },

    #[error("{path}: line {line}, column {column}: expected a JSON object per line: {message}")]
    JsonSyntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    #[error("{path}: line {line}: expected a JSON object per line, found {found}")]
    NotAnObject {
        path: PathBuf,
        line: usize,
        found: String,
    },

    #[error("{path}: line {line}: required key {key:?} not found; the object has {}", quoted_list(.keys))]
    MissingKey {
        path: PathBuf,
        line: usize,
        key: String,
        keys: Vec<String>,
    },

    #[error(
        "{path}: line {line}, key {key:?}: expected text (a string or a number), found {found}"
    )]
    NotText {
        path: PathBuf,
        line: usize,
        key: String,
        found: String,
    },

    #[error("validation fraction must be strictly between 0 and 1, found {value}")]
    InvalidFraction { value: f64 },

    #[error("number of classes must be at least 1, found 0")]
    NoClasses,

    #[error(
        "example {index} (0-based) has class {label}, expected a class below the number of \
         classes, {num_classes}"
    )]
    LabelOutOfRange {
        index: usize,
        label: usize,
        num_classes: usize,
    },
}

/// `"a", "b", "c"`: quoted so that stray whitespace in a name is visible.
fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One data record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based record number, the header being row 1.
    pub row: usize,
    /// The `uuid` column's value, empty when the file has no such column.
    pub uuid: String,
    /// Field values in header order.
    pub fields: Vec<String>,
}

/// A CSV file read into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub path: PathBuf,
    pub columns: Vec<String>,
    pub records: Vec<Record>,
}

/// The most bytes graft reads in one field: far beyond any abstract, small enough that a broken
/// file (an unclosed quote swallowing the rest) is reported instead of tokenized.
pub const MAX_FIELD_BYTES: usize = 1 << 20;

fn json_kind(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => format!("the boolean {b}"),
        serde_json::Value::Number(n) => format!("the number {n}"),
        serde_json::Value::String(_) => "a string".into(),
        serde_json::Value::Array(_) => "an array".into(),
        serde_json::Value::Object(_) => "an object".into(),
    }
}

impl Dataset {
    /// Reads a data file by its extension: `.jsonl` (one JSON object per line), anything else
    /// as CSV.
    pub fn read(path: &Path, required: &[&str]) -> Result<Dataset, DataError> {
        if path.extension().is_some_and(|e| e == "jsonl") {
            Self::read_jsonl(path, required)
        } else {
            Self::read_csv(path, required)
        }
    }

    /// Reads JSON Lines: one object per line, blank lines skipped, string or number values, a
    /// leading byte order mark ignored. graft's one JSONL reader, for classification data and
    /// causal-LM prompt/response pairs alike. The columns are the `required` keys, then the
    /// first object's other keys; a later object may lack a key that is not required (it reads
    /// as empty). Rows are numbered by line.
    pub fn read_jsonl(path: &Path, required: &[&str]) -> Result<Dataset, DataError> {
        Self::parse_jsonl(path, &read_bytes(path)?, required)
    }

    /// [`Dataset::read_jsonl`] on bytes already read; `path` names them in messages.
    pub fn parse_jsonl(path: &Path, data: &[u8], required: &[&str]) -> Result<Dataset, DataError> {
        if data.is_empty() {
            return Err(DataError::EmptyFile {
                path: path.to_path_buf(),
            });
        }
        let data = without_bom(data);
        let mut columns: Vec<String> = required.iter().map(|c| c.to_string()).collect();
        let mut records = Vec::new();
        for (index, raw) in data.split(|&b| b == b'\n').enumerate() {
            let line = index + 1;
            let text = std::str::from_utf8(raw).map_err(|e| DataError::NonUtf8 {
                path: path.to_path_buf(),
                row: line,
                line: line as u64,
                column: "(line)".into(),
                valid_up_to: e.valid_up_to(),
            })?;
            if text.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| DataError::JsonSyntax {
                    path: path.to_path_buf(),
                    line,
                    column: e.column(),
                    message: e.to_string(),
                })?;
            let serde_json::Value::Object(object) = value else {
                return Err(DataError::NotAnObject {
                    path: path.to_path_buf(),
                    line,
                    found: json_kind(&value),
                });
            };
            if records.is_empty() {
                columns.extend(
                    object
                        .keys()
                        .filter(|k| !required.contains(&k.as_str()))
                        .cloned(),
                );
            }
            for key in required {
                if !object.contains_key(*key) {
                    return Err(DataError::MissingKey {
                        path: path.to_path_buf(),
                        line,
                        key: key.to_string(),
                        keys: object.keys().cloned().collect(),
                    });
                }
            }
            let mut fields = Vec::with_capacity(columns.len());
            for column in &columns {
                let field = match object.get(column) {
                    None => String::new(),
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Number(n)) => n.to_string(),
                    Some(other) => {
                        return Err(DataError::NotText {
                            path: path.to_path_buf(),
                            line,
                            key: column.clone(),
                            found: json_kind(other),
                        })
                    }
                };
                check_field_size(path, line, &format!("key {column:?}"), &field)?;
                fields.push(field);
            }
            let uuid = object
                .get("uuid")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            records.push(Record {
                row: line,
                uuid,
                fields,
            });
        }
        if records.is_empty() {
            return Err(DataError::NoDataRows {
                path: path.to_path_buf(),
                columns,
            });
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            columns,
            records,
        })
    }

    /// Reads an RFC 4180 CSV file with a header row. The `required` columns must all exist.
    /// A leading UTF-8 byte order mark is ignored.
    pub fn read_csv(path: &Path, required: &[&str]) -> Result<Dataset, DataError> {
        Self::parse_csv(path, &read_bytes(path)?, required)
    }

    /// [`Dataset::read_csv`] on bytes already read; `path` names them in messages.
    pub fn parse_csv(path: &Path, data: &[u8], required: &[&str]) -> Result<Dataset, DataError> {
        if data.is_empty() {
            return Err(DataError::EmptyFile {
                path: path.to_path_buf(),
            });
        }
        let bytes = without_bom(data);

        // Flexible, headerless reading: field counts and the header are checked here, so that
        // the messages can name rows, lines and columns.
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(bytes);
        let mut raw = csv::ByteRecord::new();
        let mut columns: Vec<String> = Vec::new();
        let mut records: Vec<Record> = Vec::new();
        let mut uuid_index: Option<usize> = None;
        let mut row = 0usize;
        loop {
            let start = reader.position().clone();
            let more = reader
                .read_byte_record(&mut raw)
                .map_err(|source| DataError::Csv {
                    path: path.to_path_buf(),
                    row: row + 1,
                    source,
                })?;
            if !more {
                break;
            }
            row += 1;
            let end = reader.position().byte();
            let text = slice(bytes, start.byte(), end);
            let scan = scan_quotes(text);
            let line = start.line() + scan.leading_newlines;
            let line_at = |offset: usize| start.line() + count_newlines(&text[..offset]);

            if let Some(open) = scan.unclosed {
                return Err(DataError::UnclosedQuote {
                    path: path.to_path_buf(),
                    row,
                    line,
                    quote_line: line_at(open.offset),
                    column: column_label(&columns, open.field),
                });
            }

            if let Some(stray) = scan.text_after_quote {
                return Err(DataError::TextAfterQuote {
                    path: path.to_path_buf(),
                    row,
                    line,
                    quote_line: line_at(stray.open.offset),
                    close_line: line_at(stray.offset),
                    column: column_label(&columns, stray.open.field),
                    found: snippet(&text[stray.offset..]),
                });
            }

            if row == 1 {
                columns = header_names(path, &raw, line)?;
                for column in required {
                    if !columns.iter().any(|c| c == column) {
                        return Err(DataError::MissingColumn {
                            path: path.to_path_buf(),
                            column: column.to_string(),
                            columns,
                        });
                    }
                }
                uuid_index = columns.iter().position(|c| c == "uuid");
                continue;
            }

            if raw.len() != columns.len() {
                return Err(match scan.multiline {
                    Some(open) => DataError::ProbablyUnbalancedQuote {
                        path: path.to_path_buf(),
                        row,
                        line,
                        end_line: line_at(text.len()) - ends_with_newline(text),
                        quote_line: line_at(open.offset),
                        column: column_label(&columns, open.field),
                        expected: columns.len(),
                        found: raw.len(),
                    },
                    None => DataError::RaggedRow {
                        path: path.to_path_buf(),
                        row,
                        line,
                        expected: columns.len(),
                        found: raw.len(),
                    },
                });
            }

            let mut fields = Vec::with_capacity(raw.len());
            for (i, field) in raw.iter().enumerate() {
                let value = std::str::from_utf8(field).map_err(|e| DataError::NonUtf8 {
                    path: path.to_path_buf(),
                    row,
                    line,
                    column: column_label(&columns, i),
                    valid_up_to: e.valid_up_to(),
                })?;
                check_field_size(path, row, &column_label(&columns, i), value)?;
                fields.push(value.to_string());
            }
            let uuid = uuid_index
                .and_then(|i| fields.get(i))
                .cloned()
                .unwrap_or_default();
            records.push(Record { row, uuid, fields });
        }

        if row == 0 {
            return Err(DataError::NoHeader {
                path: path.to_path_buf(),
            });
        }
        if records.is_empty() {
            return Err(DataError::NoDataRows {
                path: path.to_path_buf(),
                columns,
            });
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            columns,
            records,
        })
    }

    /// Index of `column` in the header.
    pub fn column_index(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    /// The value of `column` in `record`, or `None` when there is no such column.
    pub fn field<'a>(&'a self, record: &'a Record, column: &str) -> Option<&'a str> {
        let index = self.column_index(column)?;
        record.fields.get(index).map(|f| f.as_str())
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Renders the template for every record. A record whose template columns are all empty
    /// (or whitespace) is an error naming the row.
    pub fn texts(&self, template: &Template) -> Result<Vec<String>, DataError> {
        template
            .check_columns(&self.columns)
            .map_err(|source| DataError::Template {
                path: self.path.clone(),
                source,
            })?;
        let used = template.columns();
        let mut texts = Vec::with_capacity(self.records.len());
        for record in &self.records {
            let all_empty = used
                .iter()
                .all(|c| self.field(record, c).is_none_or(|v| v.trim().is_empty()));
            if all_empty {
                return Err(DataError::EmptyText {
                    path: self.path.clone(),
                    row: record.row,
                    uuid: record.uuid.clone(),
                    columns: used.iter().map(|c| c.to_string()).collect(),
                });
            }
            let text = template
                .render(|c| self.field(record, c))
                .map_err(|source| DataError::Render {
                    path: self.path.clone(),
                    row: record.row,
                    source,
                })?;
            texts.push(text);
        }
        Ok(texts)
    }

    /// The class id of every record, from `column` (values trimmed, matched exactly).
    pub fn labels(&self, column: &str, labels: &LabelSet) -> Result<Vec<usize>, DataError> {
        let Some(index) = self.column_index(column) else {
            return Err(DataError::MissingColumn {
                path: self.path.clone(),
                column: column.to_string(),
                columns: self.columns.clone(),
            });
        };
        let mut ids = Vec::with_capacity(self.records.len());
        for record in &self.records {
            let value = record.fields.get(index).map(|v| v.as_str()).unwrap_or("");
            match labels.index_of(value) {
                Some(id) => ids.push(id),
                None => {
                    return Err(DataError::UnknownLabel {
                        path: self.path.clone(),
                        row: record.row,
                        column: column.to_string(),
                        value: value.to_string(),
                        allowed: labels.labels().to_vec(),
                    })
                }
            }
        }
        Ok(ids)
    }
}

/// Seeded stratified split into `(train, validation)` indices, each sorted ascending.
///
/// Each class's indices are shuffled with a fresh `ChaCha8Rng::seed_from_u64(seed)` (so one
/// class's split does not depend on the others) and the first `round(n_c * val_fraction)` go
/// to validation, clamped to `1..=n_c - 1` when `n_c >= 2`; a class with one example stays in
/// training.
pub fn stratified_split(
    labels: &[usize],
    num_classes: usize,
    val_fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), DataError> {
    // Written so that NaN fails too.
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(DataError::InvalidFraction {
            value: val_fraction,
        });
    }
    if num_classes == 0 {
        return Err(DataError::NoClasses);
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (index, &label) in labels.iter().enumerate() {
        match by_class.get_mut(label) {
            Some(members) => members.push(index),
            None => {
                return Err(DataError::LabelOutOfRange {
                    index,
                    label,
                    num_classes,
                })
            }
        }
    }

    let mut train = Vec::with_capacity(labels.len());
    let mut val = Vec::new();
    for mut members in by_class {
        let n = members.len();
        let n_val = if n < 2 {
            0
        } else {
            // n * val_fraction lies in (0, n), so the cast cannot overflow or go negative.
            ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        members.shuffle(&mut rng);
        val.extend_from_slice(&members[..n_val]);
        train.extend_from_slice(&members[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok((train, val))
}

/// `data` without a leading UTF-8 byte order mark (editors on Windows may write one).
fn without_bom(data: &[u8]) -> &[u8] {
    data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn check_field_size(path: &Path, row: usize, column: &str, value: &str) -> Result<(), DataError> {
    if value.len() > MAX_FIELD_BYTES {
        return Err(DataError::FieldTooLong {
            path: path.to_path_buf(),
            row,
            column: column.to_string(),
            bytes: value.len(),
            limit: MAX_FIELD_BYTES,
        });
    }
    Ok(())
}

/// `bytes[start..end]`, clamped so that a surprising reader position cannot panic.
fn slice(bytes: &[u8], start: u64, end: u64) -> &[u8] {
    let len = bytes.len();
    let start = usize::try_from(start).unwrap_or(len).min(len);
    let end = usize::try_from(end).unwrap_or(len).clamp(start, len);
    &bytes[start..end]
}

fn count_newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// The start of `bytes` up to the line end, for messages.
fn snippet(bytes: &[u8]) -> String {
    let line_end = bytes
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..line_end]);
    let mut out: String = text.chars().take(20).collect();
    if text.chars().count() > 20 {
        out.push_str("...");
    }
    out
}

/// 1 when the record's text ends with its line terminator, so that its last line is the one
/// before.
fn ends_with_newline(bytes: &[u8]) -> u64 {
    u64::from(bytes.last() == Some(&b'\n'))
}

/// `column "abstract" (field 4)`, or `field 7 (past the header's 6)`.
fn column_label(columns: &[String], index: usize) -> String {
    match columns.get(index) {
        Some(name) => format!("column {name:?} (field {})", index + 1),
        // An empty list: the header itself is being read.
        None if columns.is_empty() => format!("field {}", index + 1),
        None => format!("field {} (past the header's {})", index + 1, columns.len()),
    }
}

/// Header names, checked for UTF-8 and duplicates.
fn header_names(path: &Path, raw: &csv::ByteRecord, line: u64) -> Result<Vec<String>, DataError> {
    let mut columns: Vec<String> = Vec::with_capacity(raw.len());
    for (i, field) in raw.iter().enumerate() {
        let name = std::str::from_utf8(field).map_err(|e| DataError::NonUtf8 {
            path: path.to_path_buf(),
            row: 1,
            line,
            column: format!("field {}", i + 1),
            valid_up_to: e.valid_up_to(),
        })?;
        if let Some(first) = columns.iter().position(|c| c == name) {
            return Err(DataError::DuplicateColumn {
                path: path.to_path_buf(),
                column: name.to_string(),
                first: first + 1,
                second: i + 1,
            });
        }
        columns.push(name.to_string());
    }
    Ok(columns)
}

/// Where a quoted field opened: byte offset in the record's text and 0-based field index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QuoteOpen {
    offset: usize,
    field: usize,
}

/// Text right after a closing quote: where it starts and which quoted field it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StrayText {
    offset: usize,
    open: QuoteOpen,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct QuoteScan {
    /// Blank lines the csv reader skipped before the record.
    leading_newlines: u64,
    /// The first quoted field that holds a line break.
    multiline: Option<QuoteOpen>,
    /// A quoted field still open at the end of the text (the end of the file).
    unclosed: Option<QuoteOpen>,
    /// The first closing quote followed by something other than a comma or line end: the
    /// mark of a quote paired with the wrong partner.
    text_after_quote: Option<StrayText>,
}

/// Re-reads one record's raw text the way csv-core does (RFC 4180 with doubled quotes; a quote
/// inside an unquoted field is literal; text after a closing quote joins the field), to find
/// what the csv crate does not report: where quoted fields open and whether one never closes.
fn scan_quotes(text: &[u8]) -> QuoteScan {
    #[derive(Clone, Copy)]
    enum State {
        LineStart,
        FieldStart,
        Unquoted,
        Quoted,
        QuoteInQuoted,
    }
    let mut scan = QuoteScan::default();
    let mut state = State::LineStart;
    let mut field = 0usize;
    let mut open = QuoteOpen {
        offset: 0,
        field: 0,
    };
    let mut open_has_newline = false;
    for (offset, &b) in text.iter().enumerate() {
        state = match state {
            State::LineStart if b == b'\n' || b == b'\r' => {
                if b == b'\n' {
                    scan.leading_newlines += 1;
                }
                State::LineStart
            }
            State::LineStart | State::FieldStart => match b {
                b'"' => {
                    open = QuoteOpen { offset, field };
                    open_has_newline = false;
                    State::Quoted
                }
                b',' => {
                    field += 1;
                    State::FieldStart
                }
                // Only the record's own terminator can follow; the rest is the next record's.
                b'\n' | b'\r' => break,
                _ => State::Unquoted,
            },
            State::Unquoted => match b {
                b',' => {
                    field += 1;
                    State::FieldStart
                }
                b'\n' | b'\r' => break,
                _ => State::Unquoted,
            },
            State::Quoted => {
                if b == b'"' {
                    State::QuoteInQuoted
                } else {
                    if (b == b'\n' || b == b'\r') && !open_has_newline {
                        open_has_newline = true;
                        if scan.multiline.is_none() {
                            scan.multiline = Some(open);
                        }
                    }
                    State::Quoted
                }
            }
            State::QuoteInQuoted => match b {
                b'"' => State::Quoted,
                b',' => {
                    field += 1;
                    State::FieldStart
                }
                b'\n' | b'\r' => break,
                _ => {
                    if scan.text_after_quote.is_none() {
                        scan.text_after_quote = Some(StrayText { offset, open });
                    }
                    State::Unquoted
                }
            },
        };
    }
    if let State::Quoted = state {
        scan.unclosed = Some(open);
    }
    scan
}
