use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One fine-tuning example: the user's prompt and the answer the model should learn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptResponse {
    pub prompt: String,
    pub response: String,
}

/// Reads one JSON object per non-blank line, each with string fields `"prompt"` and
/// `"response"` (other fields are ignored). A file without any record is an error.
pub fn read_jsonl(path: &Path) -> Result<Vec<PromptResponse>> {
    let file = File::open(path).map_err(|source| Error::ReadJsonl {
        path: path.to_path_buf(),
        source,
    })?;
    let mut pairs = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_number = i + 1;
        let line = line.map_err(|source| Error::ReadJsonlLine {
            path: path.to_path_buf(),
            line: line_number,
            source,
        })?;
        // Editors on Windows may start the file with a byte-order mark.
        let line = if line_number == 1 {
            line.trim_start_matches('\u{feff}')
        } else {
            &line
        };
        if line.trim().is_empty() {
            continue;
        }
        pairs.push(parse_line(path, line_number, line)?);
    }
    if pairs.is_empty() {
        return Err(Error::EmptyJsonl {
            path: path.to_path_buf(),
        });
    }
    Ok(pairs)
}

fn parse_line(path: &Path, line: usize, text: &str) -> Result<PromptResponse> {
    let value: Value = serde_json::from_str(text).map_err(|e| Error::JsonlSyntax {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    })?;
    let Value::Object(object) = value else {
        return Err(Error::JsonlNotObject {
            path: path.to_path_buf(),
            line,
            found: json_kind(&value),
        });
    };
    Ok(PromptResponse {
        prompt: string_field(path, line, &object, "prompt")?,
        response: string_field(path, line, &object, "response")?,
    })
}

fn string_field(
    path: &Path,
    line: usize,
    object: &Map<String, Value>,
    field: &'static str,
) -> Result<String> {
    match object.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Error::JsonlFieldType {
            path: path.to_path_buf(),
            line,
            field,
            found: json_kind(other),
        }),
        None => Err(Error::JsonlMissingField {
            path: path.to_path_buf(),
            line,
            field,
        }),
    }
}

/// "a number", "null", ...: what was found where a string or object was expected.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Writes `text` to a temporary `data.jsonl`; the directory lives as long as the guard.
    fn jsonl(text: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn pair(prompt: &str, response: &str) -> PromptResponse {
        PromptResponse {
            prompt: prompt.into(),
            response: response.into(),
        }
    }

    #[test]
    fn reads_records_skipping_blank_lines_and_extra_fields() {
        let (_dir, path) = jsonl(
            "\u{feff}{\"prompt\": \"Hi\", \"response\": \"Hello!\"}\r\n\
             \n   \n\
             {\"id\": 7, \"response\": \"两\", \"prompt\": \"1+1?\\n\"}\n"
                .as_bytes(),
        );
        let pairs = read_jsonl(&path).unwrap();
        assert_eq!(pairs, vec![pair("Hi", "Hello!"), pair("1+1?\n", "两")]);
    }

    #[test]
    fn empty_strings_are_records() {
        let (_dir, path) = jsonl(b"{\"prompt\": \"\", \"response\": \"\"}");
        assert_eq!(read_jsonl(&path).unwrap(), vec![pair("", "")]);
    }

    #[test]
    fn missing_field_names_file_line_and_field() {
        let (_dir, path) =
            jsonl(b"{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"prompt\": \"c\"}\n");
        let err = read_jsonl(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                Error::JsonlMissingField {
                    line: 3,
                    field: "response",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("data.jsonl"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("\"response\""), "{msg}");
    }

    #[test]
    fn ill_typed_field_names_what_was_found() {
        let (_dir, path) = jsonl(b"{\"prompt\": 12, \"response\": \"b\"}\n");
        let err = read_jsonl(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                Error::JsonlFieldType {
                    line: 1,
                    field: "prompt",
                    found: "a number",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("expected a string, found a number"), "{msg}");
    }

    #[test]
    fn invalid_json_names_the_line() {
        let (_dir, path) =
            jsonl(b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\",\n");
        let err = read_jsonl(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::JsonlSyntax { line: 2, .. }), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn a_line_that_is_not_an_object_is_an_error() {
        let (_dir, path) = jsonl(b"[\"a\", \"b\"]\n");
        let err = read_jsonl(&path).unwrap_err();
        assert!(
            matches!(
                err,
                Error::JsonlNotObject {
                    line: 1,
                    found: "an array",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let (_dir, path) =
            jsonl(b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"\xff\"}\n");
        let err = read_jsonl(&path).unwrap_err();
        assert!(matches!(err, Error::ReadJsonlLine { line: 2, .. }), "{err}");
    }

    #[test]
    fn empty_and_missing_files_are_errors() {
        let (_dir, path) = jsonl(b"\n \n");
        let err = read_jsonl(&path).unwrap_err();
        assert!(matches!(err, Error::EmptyJsonl { .. }), "{err}");
        assert!(err.to_string().contains("data.jsonl"), "{err}");

        let err = read_jsonl(Path::new("no/such/data.jsonl")).unwrap_err();
        assert!(matches!(err, Error::ReadJsonl { .. }), "{err}");
        assert!(err.to_string().contains("no/such/data.jsonl"), "{err}");
    }
}
