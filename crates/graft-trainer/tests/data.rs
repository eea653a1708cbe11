//! Reading the data files (CSV and JSON Lines): every malformed input is refused with a
//! message that names the file, the row or line and the column or key.
use graft_tokenizer::{LabelSet, Template};
use graft_trainer::data::*;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    let content =
        format!("{HEADER}a,T,,A,,1\nb,\"Bad title,,A,,1\nc,T,,A,,0\nd,\"Good\",,A,,1\ne,T,,A,,0\n");
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

    let ratio =
        |idx: &[usize]| idx.iter().filter(|&&i| labels[i] == 1).count() as f64 / idx.len() as f64;
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

// JSON Lines: the one reader serves classification data and causal-LM prompt/response pairs.

const PAIR: &[&str] = &["prompt", "response"];

/// Writes `text` to a temporary `data.jsonl`; the directory lives as long as the guard.
fn jsonl(text: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The (prompt, response) of each record.
fn pairs(data: &Dataset) -> Vec<(String, String)> {
    data.records
        .iter()
        .map(|r| (r.fields[0].clone(), r.fields[1].clone()))
        .collect()
}

#[test]
fn jsonl_reads_records_skipping_blank_lines_and_a_byte_order_mark() {
    let (_dir, path) = jsonl(
        "\u{feff}{\"prompt\": \"Hi\", \"response\": \"Hello!\"}\r\n\
         \n   \n\
         {\"id\": 7, \"response\": \"两\", \"prompt\": \"1+1?\\n\"}\n"
            .as_bytes(),
    );
    let data = Dataset::read_jsonl(&path, PAIR).unwrap();
    assert_eq!(
        pairs(&data),
        vec![
            ("Hi".to_string(), "Hello!".to_string()),
            ("1+1?\n".to_string(), "两".to_string())
        ]
    );
    assert_eq!(data.records[1].row, 4, "records are numbered by line");
}

#[test]
fn jsonl_empty_strings_are_records() {
    let (_dir, path) = jsonl(b"{\"prompt\": \"\", \"response\": \"\"}");
    let data = Dataset::read_jsonl(&path, PAIR).unwrap();
    assert_eq!(pairs(&data), vec![(String::new(), String::new())]);
}

#[test]
fn jsonl_missing_key_names_file_line_and_key() {
    let (_dir, path) = jsonl(b"{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"prompt\": \"c\"}\n");
    let err = Dataset::read_jsonl(&path, PAIR).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, DataError::MissingKey { line: 3, key, .. } if key == "response"),
        "{msg}"
    );
    assert!(msg.contains("data.jsonl"), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");
    assert!(msg.contains("\"response\""), "{msg}");
}

#[test]
fn jsonl_value_that_is_not_text_names_what_was_found() {
    let (_dir, path) = jsonl(b"{\"prompt\": [12], \"response\": \"b\"}\n");
    let err = Dataset::read_jsonl(&path, PAIR).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, DataError::NotText { line: 1, key, found, .. }
            if key == "prompt" && found == "an array"),
        "{msg}"
    );
}

#[test]
fn jsonl_invalid_json_names_the_line() {
    let (_dir, path) = jsonl(b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\",\n");
    let err = Dataset::read_jsonl(&path, PAIR).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DataError::JsonSyntax { line: 2, .. }),
        "{msg}"
    );
    assert!(msg.contains("line 2"), "{msg}");
}

#[test]
fn jsonl_line_that_is_not_an_object_is_an_error() {
    let (_dir, path) = jsonl(b"[\"a\", \"b\"]\n");
    let err = Dataset::read_jsonl(&path, PAIR).unwrap_err();
    assert!(
        matches!(&err, DataError::NotAnObject { line: 1, found, .. } if found == "an array"),
        "{err}"
    );
}

#[test]
fn jsonl_invalid_utf8_names_the_line() {
    let (_dir, path) = jsonl(b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"\xff\"}\n");
    let err = Dataset::read_jsonl(&path, PAIR).unwrap_err();
    assert!(matches!(err, DataError::NonUtf8 { line: 2, .. }), "{err}");
}

#[test]
fn jsonl_empty_blank_and_missing_files_are_errors() {
    let (_dir, path) = jsonl(b"");
    let err = Dataset::read_jsonl(&path, PAIR).unwrap_err();
    assert!(matches!(err, DataError::EmptyFile { .. }), "{err}");
    let (_dir, path) = jsonl(b"\n \n");
    let err = Dataset::read_jsonl(&path, PAIR).unwrap_err();
    assert!(matches!(err, DataError::NoDataRows { .. }), "{err}");
    assert!(err.to_string().contains("data.jsonl"), "{err}");

    let err = Dataset::read_jsonl(Path::new("no/such/data.jsonl"), PAIR).unwrap_err();
    assert!(err.to_string().contains("no/such/data.jsonl"), "{err}");
}
