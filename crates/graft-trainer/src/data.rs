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

    /// Reads JSON Lines: one object per line, blank lines skipped, string or number values. The
    /// columns are the `required` keys, then the first object's other keys; a later object
    /// may lack a key that is not required (it reads as empty). Rows are numbered by line.
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
        let bytes: &[u8] = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const REQUIRED: &[&str] = &["uuid", "title", "abstract", "label"];
    const HEADER: &str = "uuid,title,author,abstract,Keywords,label\n";

    fn workspace_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// Writes `content` to a temporary `.csv` file (deleted when the handle drops).
    fn csv_file(content: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".csv")
            .tempfile()
            .expect("create temp file");
        file.write_all(content).expect("write temp file");
        file.flush().expect("flush temp file");
        file
    }

    fn read(content: &str) -> Result<Dataset, DataError> {
        let file = csv_file(content.as_bytes());
        Dataset::read_csv(file.path(), REQUIRED)
    }

    fn read_err(content: &[u8]) -> (DataError, String) {
        let file = csv_file(content);
        let err = Dataset::read_csv(file.path(), REQUIRED).expect_err("expected an error");
        let msg = err.to_string();
        assert!(
            msg.contains(&file.path().display().to_string()),
            "message does not name the file: {msg}"
        );
        (err, msg)
    }

    fn binary_labels() -> LabelSet {
        LabelSet::new(vec!["0".to_string(), "1".to_string()]).unwrap()
    }

    #[test]
    fn reads_quoted_commas_doubled_quotes_and_multiline_fields() {
        let content = "uuid,title,author,abstract,Keywords,label\r\n\
             a1,\"Heart, lung and kidney\",,\"We study \"\"acute\"\" failure.\r\nSecond line, with comma.\",,1\r\n\
             a2,Plain title,\"Doe, J.; Roe, R.\",Short.,\"k1,k2\",0\r\n\
             \r\n\
             a3,\"\",,\"Line one\nline two\n\nline four\",, 1 \r\n";
        let ds = read(content).unwrap();
        assert_eq!(
            ds.columns,
            vec!["uuid", "title", "author", "abstract", "Keywords", "label"]
        );
        assert_eq!(ds.len(), 3);
        let r = &ds.records[0];
        assert_eq!(r.row, 2);
        assert_eq!(r.uuid, "a1");
        assert_eq!(ds.field(r, "title"), Some("Heart, lung and kidney"));
        assert_eq!(
            ds.field(r, "abstract"),
            Some("We study \"acute\" failure.\r\nSecond line, with comma.")
        );
        assert_eq!(ds.field(r, "author"), Some(""));
        assert_eq!(ds.field(r, "nope"), None);
        let r = &ds.records[1];
        assert_eq!(r.row, 3);
        assert_eq!(ds.field(r, "author"), Some("Doe, J.; Roe, R."));
        assert_eq!(ds.field(r, "Keywords"), Some("k1,k2"));
        // The blank line is skipped: the next record is row 4.
        let r = &ds.records[2];
        assert_eq!(r.row, 4);
        assert_eq!(
            ds.field(r, "abstract"),
            Some("Line one\nline two\n\nline four")
        );
        assert_eq!(ds.labels("label", &binary_labels()).unwrap(), vec![1, 0, 1]);

        let template = Template::parse(graft_tokenizer::DEFAULT_TEMPLATE).unwrap();
        let texts = ds.texts(&template).unwrap();
        assert_eq!(texts[1], "Plain title. Short.");
        assert_eq!(texts[2], ". Line one\nline two\n\nline four");
    }

    #[test]
    fn file_without_trailing_newline_and_with_bom() {
        let ds = read("\u{feff}uuid,title,author,abstract,Keywords,label\nx,T,,A,,0").unwrap();
        assert_eq!(ds.columns[0], "uuid");
        assert_eq!(ds.records[0].uuid, "x");
        assert_eq!(ds.field(&ds.records[0], "label"), Some("0"));
    }

    #[test]
    fn file_without_uuid_column_has_empty_uuids() {
        let file = csv_file(b"title,abstract\nT,A\n");
        let ds = Dataset::read_csv(file.path(), &["title"]).unwrap();
        assert_eq!(ds.records[0].uuid, "");
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.csv");
        let err = Dataset::read_csv(&path, REQUIRED).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Io { .. }), "{msg}");
        assert!(msg.contains("absent.csv"), "{msg}");
    }

    #[test]
    fn empty_file_is_an_error() {
        let (err, msg) = read_err(b"");
        assert!(matches!(err, DataError::EmptyFile { .. }), "{msg}");
        assert!(msg.contains("empty (0 bytes)"), "{msg}");
    }

    #[test]
    fn blank_lines_only_is_an_error() {
        let (err, msg) = read_err(b"\n\r\n\n");
        assert!(matches!(err, DataError::NoHeader { .. }), "{msg}");
    }

    #[test]
    fn header_only_is_an_error() {
        let (err, msg) = read_err(HEADER.as_bytes());
        assert!(matches!(err, DataError::NoDataRows { .. }), "{msg}");
        assert!(msg.contains("no data rows"), "{msg}");
        assert!(msg.contains("\"uuid\", \"title\""), "{msg}");
    }

    #[test]
    fn missing_required_column_lists_the_header() {
        let (err, msg) = read_err(b"uuid,title,author,abstract,Keywords\nx,T,,A,\n");
        assert!(
            matches!(&err, DataError::MissingColumn { column, .. } if column == "label"),
            "{msg}"
        );
        assert!(msg.contains("row 1 (header)"), "{msg}");
        assert!(msg.contains("\"label\""), "{msg}");
        assert!(
            msg.contains("\"uuid\", \"title\", \"author\", \"abstract\", \"Keywords\""),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_column_names_both_positions() {
        let (err, msg) = read_err(b"uuid,title,abstract,title,label\nx,T,A,T,1\n");
        assert!(
            matches!(&err, DataError::DuplicateColumn { column, first: 2, second: 4, .. } if column == "title"),
            "{msg}"
        );
        assert!(msg.contains("columns 2 and 4"), "{msg}");
    }

    #[test]
    fn short_row_names_row_and_counts() {
        let content = format!("{HEADER}a,T,,A,,1\nb,T,,A,1\nc,T,,A,,0\n");
        let (err, msg) = read_err(content.as_bytes());
        assert!(
            matches!(
                err,
                DataError::RaggedRow {
                    row: 3,
                    line: 3,
                    expected: 6,
                    found: 5,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("row 3 (line 3)"), "{msg}");
        assert!(msg.contains("expected 6 fields"), "{msg}");
        assert!(msg.contains("found 5"), "{msg}");
    }

    #[test]
    fn long_row_after_multiline_record_reports_its_row_and_line() {
        // Row 2 spans lines 2-3, so row 3 starts on line 4.
        let content = format!("{HEADER}a,T,,\"two\nlines\",,1\nb,T,,A,,1,extra\n");
        let (err, msg) = read_err(content.as_bytes());
        assert!(
            matches!(
                err,
                DataError::RaggedRow {
                    row: 3,
                    line: 4,
                    expected: 6,
                    found: 7,
                    ..
                }
            ),
            "{msg}"
        );
    }

    #[test]
    fn unbalanced_quote_mid_file_is_reported_where_it_opened() {
        // Row 3's title opens a quote that pairs with the opening quote on line 5, which is
        // then followed by text: the field count happens to be right, the quote is not.
        let content = format!(
            "{HEADER}a,T,,A,,1\nb,\"Bad title,,A,,1\nc,T,,A,,0\nd,\"Good\",,A,,1\ne,T,,A,,0\n"
        );
        let (err, msg) = read_err(content.as_bytes());
        assert!(
            matches!(
                &err,
                DataError::TextAfterQuote {
                    row: 3,
                    line: 3,
                    quote_line: 3,
                    close_line: 5,
                    column,
                    found,
                    ..
                } if column.contains("\"title\"") && found == "Good\",,A,,1"
            ),
            "{msg}"
        );
        assert!(msg.contains("probably has an unbalanced"), "{msg}");
        assert!(msg.contains("opened on line 3"), "{msg}");
    }

    #[test]
    fn undoubled_quote_inside_quoted_field() {
        let content = format!("{HEADER}a,\"He said \"hi\" twice\",,A,,1\n");
        let (err, msg) = read_err(content.as_bytes());
        assert!(
            matches!(&err, DataError::TextAfterQuote { row: 2, quote_line: 2, close_line: 2, found, .. } if found == "hi\" twice\",,A,,1"),
            "{msg}"
        );
        assert!(msg.contains("must be doubled"), "{msg}");
    }

    #[test]
    fn ragged_multiline_row_probably_has_unbalanced_quote() {
        // The quote opened on line 3 closes at the end of line 4: one record of 2 fields.
        let content = format!("{HEADER}a,T,,A,,1\nb,\"Bad title,,A,,1\nc,T,,A,,\"\nd,T,,A,,0\n");
        let (err, msg) = read_err(content.as_bytes());
        assert!(
            matches!(
                &err,
                DataError::ProbablyUnbalancedQuote {
                    row: 3,
                    line: 3,
                    end_line: 4,
                    quote_line: 3,
                    expected: 6,
                    found: 2,
                    column,
                    ..
                } if column.contains("\"title\"")
            ),
            "{msg}"
        );
        assert!(msg.contains("row 3 (lines 3-4)"), "{msg}");
        assert!(msg.contains("probably has an unbalanced quote"), "{msg}");
    }

    #[test]
    fn ragged_row_line_numbers_with_crlf_and_blank_lines() {
        let content = "uuid,title,author,abstract,Keywords,label\r\n\
             a,\"x\r\ny\",,A,,1\r\n\r\n\r\nb,T,,A,,1,7\r\n";
        let (err, msg) = read_err(content.as_bytes());
        assert!(
            matches!(
                err,
                DataError::RaggedRow {
                    row: 3,
                    line: 6,
                    found: 7,
                    ..
                }
            ),
            "{msg}"
        );
    }

    #[test]
    fn unbalanced_quote_at_end_of_file_with_right_field_count() {
        // The last field opens a quote that never closes: the field count is still right.
        let content = format!("{HEADER}a,T,,A,,1\nb,T,,A,,\"1\nc,T,,A,,0\n");
        let (err, msg) = read_err(content.as_bytes());
        assert!(
            matches!(
                &err,
                DataError::UnclosedQuote {
                    row: 3,
                    line: 3,
                    quote_line: 3,
                    column,
                    ..
                } if column.contains("\"label\"")
            ),
            "{msg}"
        );
        assert!(msg.contains("never closed"), "{msg}");
        assert!(msg.contains("end of the file"), "{msg}");
        assert!(msg.contains("probably has an unbalanced quote"), "{msg}");
    }

    #[test]
    fn unbalanced_quote_at_end_of_file_in_multiline_abstract() {
        let content = format!("{HEADER}a,T,,A,,1\nb,T,,\"A\nstill abstract,,0\nc,T,,A,,0");
        let (err, msg) = read_err(content.as_bytes());
        assert!(
            matches!(
                &err,
                DataError::UnclosedQuote {
                    row: 3,
                    quote_line: 3,
                    column,
                    ..
                } if column.contains("\"abstract\"")
            ),
            "{msg}"
        );
    }

    #[test]
    fn quote_inside_unquoted_field_is_literal() {
        let content = format!("{HEADER}a,5\" screens,,A,,1\n");
        let ds = read(&content).unwrap();
        assert_eq!(ds.field(&ds.records[0], "title"), Some("5\" screens"));
    }

    #[test]
    fn non_utf8_field_names_row_and_column() {
        let mut content = HEADER.as_bytes().to_vec();
        content.extend_from_slice(b"a,T,,A,,1\nb,T,,caf\xE9 au lait,,0\n");
        let (err, msg) = read_err(&content);
        assert!(
            matches!(
                &err,
                DataError::NonUtf8 {
                    row: 3,
                    valid_up_to: 3,
                    column,
                    ..
                } if column.contains("\"abstract\"")
            ),
            "{msg}"
        );
        assert!(msg.contains("row 3"), "{msg}");
        assert!(msg.contains("expected UTF-8"), "{msg}");
    }

    #[test]
    fn non_utf8_header_names_row_1() {
        let (err, msg) = read_err(b"uuid,ti\xFFtle,abstract,label\nx,T,A,1\n");
        assert!(
            matches!(&err, DataError::NonUtf8 { row: 1, column, .. } if column == "field 2"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_label_names_row_column_value_and_allowed() {
        let ds = read(&format!("{HEADER}a,T,,A,,1\nb,T,,A,,medical\n")).unwrap();
        let err = ds.labels("label", &binary_labels()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, DataError::UnknownLabel { row: 3, value, .. } if value == "medical"),
            "{msg}"
        );
        assert!(msg.contains(&ds.path.display().to_string()), "{msg}");
        assert!(msg.contains("row 3, column \"label\""), "{msg}");
        assert!(msg.contains("found \"medical\""), "{msg}");
        assert!(msg.contains("\"0\", \"1\""), "{msg}");
    }

    #[test]
    fn labels_from_missing_column_is_an_error() {
        let ds = read(&format!("{HEADER}a,T,,A,,1\n")).unwrap();
        let err = ds.labels("class", &binary_labels()).unwrap_err();
        assert!(matches!(&err, DataError::MissingColumn { column, .. } if column == "class"));
    }

    #[test]
    fn texts_with_all_template_fields_empty_names_the_row() {
        let ds = read(&format!("{HEADER}a,T,,A,,1\nb,, ,\"\",,0\n")).unwrap();
        let template = Template::parse(graft_tokenizer::TEMPLATE_WITH_AUTHOR).unwrap();
        let err = ds.texts(&template).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, DataError::EmptyText { row: 3, uuid, .. } if uuid == "b"),
            "{msg}"
        );
        assert!(msg.contains("\"title\", \"author\", \"abstract\""), "{msg}");
    }

    #[test]
    fn texts_with_unknown_template_column_names_it() {
        let ds = read(&format!("{HEADER}a,T,,A,,1\n")).unwrap();
        let template = Template::parse("{title} {summary}").unwrap();
        let err = ds.texts(&template).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Template { .. }), "{msg}");
        assert!(msg.contains("\"summary\""), "{msg}");
        assert!(msg.contains(&ds.path.display().to_string()), "{msg}");
    }

    #[test]
    fn split_rejects_bad_fraction() {
        for value in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            let err = stratified_split(&[0, 1, 0, 1], 2, value, 1).unwrap_err();
            assert!(matches!(err, DataError::InvalidFraction { .. }), "{err}");
        }
    }

    #[test]
    fn split_rejects_label_out_of_range() {
        let err = stratified_split(&[0, 1, 2], 2, 0.5, 1).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    index: 2,
                    label: 2,
                    num_classes: 2
                }
            ),
            "{err}"
        );
        assert!(matches!(
            stratified_split(&[], 0, 0.5, 1),
            Err(DataError::NoClasses)
        ));
    }

    #[test]
    fn split_small_classes() {
        // Class 0: 1 example (stays in train); class 1: 2 (one to val); class 2: 10 (one to val).
        let labels = [0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2];
        let (train, val) = stratified_split(&labels, 3, 0.1, 7).unwrap();
        assert_eq!(val.len(), 2);
        assert_eq!(train.len(), 11);
        assert!(train.contains(&0));
        assert_eq!(val.iter().filter(|&&i| labels[i] == 1).count(), 1);
        assert_eq!(val.iter().filter(|&&i| labels[i] == 2).count(), 1);
        // A large fraction still leaves one example of each class in train.
        let (train, val) = stratified_split(&[1, 1], 2, 0.9, 7).unwrap();
        assert_eq!((train.len(), val.len()), (1, 1));
    }

    #[test]
    fn split_depends_on_seed() {
        let labels: Vec<usize> = (0..200).map(|i| i % 2).collect();
        let a = stratified_split(&labels, 2, 0.2, 1).unwrap();
        let b = stratified_split(&labels, 2, 0.2, 2).unwrap();
        assert_eq!(a, stratified_split(&labels, 2, 0.2, 1).unwrap());
        assert_ne!(a.1, b.1);
    }

    proptest::proptest! {
        #[test]
        fn split_partitions_the_indices(
            labels in proptest::collection::vec(0usize..4, 0..300),
            fraction in 0.01f64..0.99,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let (train, val) = stratified_split(&labels, 4, fraction, seed).unwrap();
            let mut all: Vec<usize> = train.iter().chain(val.iter()).copied().collect();
            all.sort_unstable();
            proptest::prop_assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());
            proptest::prop_assert!(train.windows(2).all(|w| w[0] < w[1]));
            proptest::prop_assert!(val.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn reads_the_challenge_train_csv_and_splits_it() {
        let path = workspace_root().join("../shared/data/abstracts/train.csv");
        assert!(
            path.is_file(),
            "{} not found: this test needs ../shared next to the workspace",
            path.display()
        );
        let ds = Dataset::read_csv(&path, REQUIRED).unwrap();
        assert_eq!(
            ds.columns,
            vec!["uuid", "title", "author", "abstract", "Keywords", "label"]
        );
        assert_eq!(ds.len(), 5371);
        assert_eq!(ds.records[0].row, 2);
        let labels = ds.labels("label", &binary_labels()).unwrap();
        assert_eq!(labels.iter().filter(|&&l| l == 1).count(), 3045);
        assert_eq!(labels.iter().filter(|&&l| l == 0).count(), 2326);
        let template = Template::parse(graft_tokenizer::DEFAULT_TEMPLATE).unwrap();
        assert_eq!(ds.texts(&template).unwrap().len(), 5371);

        let seed = 20230701;
        let (train, val) = stratified_split(&labels, 2, 0.1, seed).unwrap();
        assert_eq!(
            (train.clone(), val.clone()),
            stratified_split(&labels, 2, 0.1, seed).unwrap()
        );
        assert!(train.iter().all(|i| val.binary_search(i).is_err()));
        assert_eq!(train.len() + val.len(), labels.len());
        let mut all: Vec<usize> = train.iter().chain(val.iter()).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());

        let ratio = |idx: &[usize]| {
            idx.iter().filter(|&&i| labels[i] == 1).count() as f64 / idx.len() as f64
        };
        let overall = 3045.0 / 5371.0;
        assert!(
            (ratio(&val) - overall).abs() < 0.01,
            "val ratio {}",
            ratio(&val)
        );
        assert!(
            (ratio(&train) - overall).abs() < 0.01,
            "train ratio {}",
            ratio(&train)
        );
        assert!(
            (val.len() as f64 - 537.1).abs() <= 2.0,
            "val size {}",
            val.len()
        );
    }

    #[test]
    fn reads_the_demo_csv() {
        let path = workspace_root().join("data/demo.csv");
        let ds = Dataset::read_csv(&path, REQUIRED).unwrap();
        assert_eq!(
            ds.columns,
            vec!["uuid", "title", "author", "abstract", "Keywords", "label"]
        );
        assert_eq!(ds.len(), 40);
        let labels = ds.labels("label", &binary_labels()).unwrap();
        assert_eq!(labels.iter().filter(|&&l| l == 1).count(), 20);
        assert_eq!(labels.iter().filter(|&&l| l == 0).count(), 20);
        let template = Template::parse(graft_tokenizer::DEFAULT_TEMPLATE).unwrap();
        let texts = ds.texts(&template).unwrap();
        assert!(texts.iter().all(|t| t.len() > 100));
        let mut uuids: Vec<&str> = ds.records.iter().map(|r| r.uuid.as_str()).collect();
        uuids.sort_unstable();
        uuids.dedup();
        assert_eq!(uuids.len(), 40);
    }
}
