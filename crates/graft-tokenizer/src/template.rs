use crate::error::{Error, Result};

/// The challenge's text: title and abstract.
pub const DEFAULT_TEMPLATE: &str = "{title}. {abstract}";
/// Title, authors and abstract.
pub const TEMPLATE_WITH_AUTHOR: &str = "{title}. {author}. {abstract}";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Column(String),
}

/// Text with `{column}` placeholders; `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses a template. Column names are trimmed of surrounding whitespace.
    pub fn parse(s: &str) -> Result<Self> {
        let syntax = |position: usize, message: &str| Error::TemplateSyntax {
            template: s.to_string(),
            position,
            message: message.to_string(),
        };

        let mut pieces = Vec::new();
        let mut literal = String::new();
        // 1-based character positions, for error messages.
        let mut chars = s.chars().enumerate().map(|(i, c)| (i + 1, c)).peekable();
        while let Some((pos, c)) = chars.next() {
            match c {
                '{' => {
                    if chars.next_if(|&(_, c)| c == '{').is_some() {
                        literal.push('{');
                        continue;
                    }
                    let mut name = String::new();
                    let mut closed = false;
                    for (inner_pos, inner) in chars.by_ref() {
                        match inner {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => {
                                return Err(syntax(
                                    inner_pos,
                                    &format!(
                                        "expected `}}` to close the placeholder opened at \
                                         character {pos}, found `{{`"
                                    ),
                                ))
                            }
                            other => name.push(other),
                        }
                    }
                    if !closed {
                        return Err(syntax(
                            pos,
                            "unclosed `{` (expected `}` before the end; write `{{` for a literal brace)",
                        ));
                    }
                    let name = name.trim();
                    if name.is_empty() {
                        return Err(syntax(
                            pos,
                            "empty placeholder `{}` (expected a column name)",
                        ));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Column(name.to_string()));
                }
                '}' => {
                    if chars.next_if(|&(_, c)| c == '}').is_some() {
                        literal.push('}');
                    } else {
                        return Err(syntax(
                            pos,
                            "unmatched `}` (expected `}}` for a literal brace)",
                        ));
                    }
                }
                other => literal.push(other),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Self {
            source: s.to_string(),
            pieces,
        })
    }

    /// The template text as given to `parse`.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Placeholder names in order of first use, without duplicates.
    pub fn columns(&self) -> Vec<&str> {
        let mut columns: Vec<&str> = Vec::new();
        for piece in &self.pieces {
            if let Piece::Column(name) = piece {
                if !columns.contains(&name.as_str()) {
                    columns.push(name);
                }
            }
        }
        columns
    }

    /// Checks that every placeholder names one of `available` (exact, case-sensitive match).
    pub fn check_columns(&self, available: &[String]) -> Result<()> {
        for column in self.columns() {
            if !available.iter().any(|a| a == column) {
                return Err(Error::MissingColumn {
                    template: self.source.clone(),
                    column: column.to_string(),
                    available: available.to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Fills the placeholders with `value_of(column)`; `None` is an error naming the column.
    // `'v` is separate from the argument's lifetime: with `Fn(&str) -> Option<&str>` the
    // value would have to live as long as the column name, which rules out borrowing a record.
    pub fn render<'v>(&self, value_of: impl Fn(&str) -> Option<&'v str>) -> Result<String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Column(name) => match value_of(name) {
                    Some(value) => out.push_str(value),
                    None => {
                        return Err(Error::MissingValue {
                            template: self.source.clone(),
                            column: name.clone(),
                        })
                    }
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_templates_parse() {
        let t = Template::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(t.columns(), vec!["title", "abstract"]);
        let t = Template::parse(TEMPLATE_WITH_AUTHOR).unwrap();
        assert_eq!(t.columns(), vec!["title", "author", "abstract"]);
        assert_eq!(t.as_str(), TEMPLATE_WITH_AUTHOR);
    }

    #[test]
    fn renders_values_and_escaped_braces() {
        let t = Template::parse("{{x}} {a}: {b} }}{a}").unwrap();
        assert_eq!(t.columns(), vec!["a", "b"]);
        let values: HashMap<String, String> = [("a", "1"), ("b", "two, three")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let text = t.render(|c| values.get(c).map(|v| v.as_str())).unwrap();
        assert_eq!(text, "{x} 1: two, three }1");
    }

    #[test]
    fn names_are_trimmed() {
        let t = Template::parse("{ title }").unwrap();
        assert_eq!(t.columns(), vec!["title"]);
    }

    #[test]
    fn template_without_placeholders() {
        let t = Template::parse("plain").unwrap();
        assert!(t.columns().is_empty());
        assert_eq!(t.render(|_| None).unwrap(), "plain");
        assert_eq!(Template::parse("").unwrap().render(|_| None).unwrap(), "");
    }

    #[test]
    fn unclosed_brace_names_position() {
        let err = Template::parse("{title}. {abstract").unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::TemplateSyntax { position: 10, .. }),
            "{msg}"
        );
        assert!(msg.contains("unclosed `{`"), "{msg}");
        assert!(msg.contains("at character 10"), "{msg}");
    }

    #[test]
    fn empty_name_names_position() {
        let err = Template::parse("ab {  }").unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::TemplateSyntax { position: 4, .. }),
            "{msg}"
        );
        assert!(msg.contains("empty placeholder"), "{msg}");
    }

    #[test]
    fn nested_open_brace_is_an_error() {
        let err = Template::parse("{a{b}").unwrap_err();
        assert!(
            matches!(err, Error::TemplateSyntax { position: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn lone_closing_brace_is_an_error() {
        let err = Template::parse("a } b").unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::TemplateSyntax { position: 3, .. }),
            "{msg}"
        );
        assert!(msg.contains("unmatched `}`"), "{msg}");
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let err = Template::parse("é {").unwrap_err();
        assert!(
            matches!(err, Error::TemplateSyntax { position: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn check_columns_names_missing_and_available() {
        let t = Template::parse(TEMPLATE_WITH_AUTHOR).unwrap();
        let available = strings(&["uuid", "title", "abstract", "label"]);
        let err = t.check_columns(&available).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(&err, Error::MissingColumn { column, .. } if column == "author"));
        assert!(msg.contains("\"author\""), "{msg}");
        assert!(
            msg.contains("\"uuid\", \"title\", \"abstract\", \"label\""),
            "{msg}"
        );
        t.check_columns(&strings(&["title", "author", "abstract"]))
            .unwrap();
    }

    #[test]
    fn render_missing_value_names_column() {
        let t = Template::parse(DEFAULT_TEMPLATE).unwrap();
        let err = t
            .render(|c| if c == "title" { Some("T") } else { None })
            .unwrap_err();
        assert!(matches!(&err, Error::MissingValue { column, .. } if column == "abstract"));
    }
}
