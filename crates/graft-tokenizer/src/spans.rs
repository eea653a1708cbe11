//! Token labels for sequence tagging: phrases marked in a text as character spans, spans turned
//! into one BIO tag per token from the tokenizer's offsets, and tags turned back into spans.
//!
//! Which sub-tokens carry a label: every token that overlaps a marked span does, the first
//! `B`, the rest `I`; a token outside every span is `O`; special tokens (`[CLS]`, `[SEP]`, BOS)
//! and padding carry none (their offsets are `None`, as [`crate::TextTokenizer::encode_with_offsets`]
//! gives them). So a word split into sub-tokens has its label on each of them, and
//! prediction reads a span from its first `B` (or a stray `I`) to its last `I`.

/// A marked part of a text: byte offsets `start..end` (on char boundaries) and the entity type
/// (empty for untyped BIO tags).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub kind: String,
}

/// What [`mark_phrases`] found: the spans, in text order, and the phrases it found nowhere
/// (counted by the caller, never dropped silently).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Marked {
    pub spans: Vec<Span>,
    pub unmatched: Vec<String>,
}

/// Marks every occurrence of each phrase in `text`: compared case-insensitively (char by char,
/// Unicode lower case), only on word boundaries (no letter or digit just outside a match
/// whose edge is a letter or digit), longest phrase first, and never over a span already
/// marked. A phrase that is empty after trimming is ignored; one marked nowhere (absent, or
/// only inside longer phrases' spans) is returned in `unmatched`, once.
pub fn mark_phrases(text: &str, phrases: &[String], kind: &str) -> Marked {
    let mut ordered: Vec<&str> = phrases
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect();
    // Longest first (in chars); ties in the given order.
    ordered.sort_by_key(|p| std::cmp::Reverse(p.chars().count()));
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut marked = Marked::default();
    let mut seen_unmatched = std::collections::HashSet::new();
    for phrase in ordered {
        let wanted: Vec<char> = phrase.chars().collect();
        let mut found = false;
        let mut i = 0;
        while i + wanted.len() <= chars.len() {
            if matches_at(&chars, i, &wanted) {
                let start = chars[i].0;
                let end = chars
                    .get(i + wanted.len())
                    .map_or(text.len(), |&(offset, _)| offset);
                let free = marked
                    .spans
                    .iter()
                    .all(|s| end <= s.start || start >= s.end);
                if free {
                    marked.spans.push(Span {
                        start,
                        end,
                        kind: kind.to_string(),
                    });
                    found = true;
                    i += wanted.len();
                    continue;
                }
            }
            i += 1;
        }
        if !found && seen_unmatched.insert(phrase.to_lowercase()) {
            marked.unmatched.push(phrase.to_string());
        }
    }
    marked.spans.sort();
    marked
}

fn same_letter(a: char, b: char) -> bool {
    a == b || a.to_lowercase().eq(b.to_lowercase())
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric()
}

/// Whether `wanted` stands at char `i` of `chars`, on word boundaries.
fn matches_at(chars: &[(usize, char)], i: usize, wanted: &[char]) -> bool {
    let Some((&first, &last)) = wanted.first().zip(wanted.last()) else {
        return false;
    };
    if !wanted
        .iter()
        .zip(&chars[i..])
        .all(|(&w, &(_, c))| same_letter(w, c))
    {
        return false;
    }
    let before = i.checked_sub(1).map(|j| chars[j].1);
    let after = chars.get(i + wanted.len()).map(|&(_, c)| c);
    let open_start = !is_word(first) || !before.is_some_and(is_word);
    let open_end = !is_word(last) || !after.is_some_and(is_word);
    open_start && open_end
}

/// A token's byte range in its text; `None` for a special token or padding.
pub type TokenOffsets = Option<(usize, usize)>;

/// One token's tag: outside every span, the first token of a span, or a later one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    Outside,
    Begin(String),
    Inside(String),
}

impl Tag {
    /// Reads `O`, `B`, `I`, `B-TYPE`, `I-TYPE` (the CoNLL and seqeval spelling); `None` for
    /// anything else.
    pub fn parse(label: &str) -> Option<Self> {
        let (prefix, kind) = match label.split_once('-') {
            Some((prefix, kind)) => (prefix, kind.to_string()),
            None => (label, String::new()),
        };
        match prefix {
            "O" if kind.is_empty() => Some(Self::Outside),
            "B" => Some(Self::Begin(kind)),
            "I" => Some(Self::Inside(kind)),
            _ => None,
        }
    }

    /// The label as [`Tag::parse`] reads it.
    pub fn label(&self) -> String {
        let with = |prefix: &str, kind: &str| {
            if kind.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}-{kind}")
            }
        };
        match self {
            Self::Outside => "O".into(),
            Self::Begin(kind) => with("B", kind),
            Self::Inside(kind) => with("I", kind),
        }
    }

    fn kind(&self) -> Option<&str> {
        match self {
            Self::Outside => None,
            Self::Begin(kind) | Self::Inside(kind) => Some(kind),
        }
    }
}

/// One tag per token from its byte offsets in the text (`None` for a special token or
/// padding, which gets no tag): a token overlapping a span is `B` if it is the span's first
/// such token, else `I`; every other token `O`.
pub fn tag_tokens(offsets: &[TokenOffsets], spans: &[Span]) -> Vec<Option<Tag>> {
    let mut tags = Vec::with_capacity(offsets.len());
    let mut previous_span = None;
    for offset in offsets {
        let Some((start, end)) = *offset else {
            tags.push(None);
            continue;
        };
        let span = spans.iter().position(|s| start < s.end && end > s.start);
        tags.push(Some(match span {
            None => Tag::Outside,
            Some(s) if previous_span == Some(s) => Tag::Inside(spans[s].kind.clone()),
            Some(s) => Tag::Begin(spans[s].kind.clone()),
        }));
        previous_span = span;
    }
    tags
}

/// The entities of a tag sequence as seqeval's default mode (CoNLL's conlleval) reads them:
/// an entity starts at a `B`, or at an `I` after `O` or after another type, and ends before
/// the next `O`, `B` or change of type. Returns `(first token, last token + 1, type)`. Tokens
/// without a tag (`None`) are skipped: they neither end nor continue an entity.
pub fn entities(tags: &[Option<Tag>]) -> Vec<(usize, usize, String)> {
    let mut found = Vec::new();
    let mut open: Option<(usize, usize, String)> = None;
    for (i, tag) in tags.iter().enumerate() {
        let Some(tag) = tag else { continue };
        let continues = match (tag, &open) {
            (Tag::Inside(kind), Some((_, _, open_kind))) => kind == open_kind,
            _ => false,
        };
        if continues {
            if let Some(entity) = open.as_mut() {
                entity.1 = i + 1;
            }
            continue;
        }
        found.extend(open.take());
        if let Some(kind) = tag.kind() {
            open = Some((i, i + 1, kind.to_string()));
        }
    }
    found.extend(open);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phrases(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn texts(text: &str, marked: &Marked) -> Vec<String> {
        marked
            .spans
            .iter()
            .map(|s| text[s.start..s.end].to_string())
            .collect()
    }

    /// A row of the marking table: text, phrases, the marked texts in order, the unmatched
    /// phrases.
    type MarkingCase<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);

    /// Case, word boundaries, longest first, overlaps and unmatched phrases, as a table.
    #[test]
    fn phrases_are_marked_as_the_rules_say() {
        let cases: &[MarkingCase] = &[
            // Case-insensitive, every occurrence.
            (
                "Solar cells. solar CELLS!",
                &["solar cells"],
                &["Solar cells", "solar CELLS"],
                &[],
            ),
            // Word boundaries: "cell" is not marked inside "cells" or "cellular".
            ("cells and cellular cell", &["cell"], &["cell"], &[]),
            // Longest first: the longer phrase wins where they overlap; the shorter one is
            // still marked where it stands alone.
            (
                "deep learning for learning rates",
                &["learning", "deep learning"],
                &["deep learning", "learning"],
                &[],
            ),
            // A phrase found only inside a longer one's span counts as unmatched.
            (
                "deep learning",
                &["learning", "deep learning"],
                &["deep learning"],
                &["learning"],
            ),
            // Overlapping phrases of equal length: the first given wins.
            ("a b c", &["a b", "b c"], &["a b"], &["b c"]),
            // Absent phrases, empty phrases and repeats: counted once, empty ignored.
            (
                "graphene oxide",
                &["graphene", "", "nanotube", "NANOTUBE"],
                &["graphene"],
                &["nanotube"],
            ),
            // Punctuation at a phrase's edge needs no boundary; non-ASCII case folds.
            (
                "Über-Modell (C++) and ÜBER",
                &["über", "c++"],
                &["Über", "C++", "ÜBER"],
                &[],
            ),
            // Hyphens are word boundaries.
            ("dye-sensitized", &["dye"], &["dye"], &[]),
        ];
        for &(text, given, want, unmatched) in cases {
            let marked = mark_phrases(text, &phrases(given), "");
            assert_eq!(texts(text, &marked), want, "{text:?} {given:?}");
            assert_eq!(marked.unmatched, unmatched, "{text:?} {given:?}");
        }
    }

    #[test]
    fn tokens_take_b_then_i_and_special_tokens_none() {
        // "[CLS] graph ##ene oxide is new [SEP] [PAD]" over "graphene oxide is new".
        let text = "graphene oxide is new";
        let marked = mark_phrases(text, &phrases(&["graphene oxide", "new"]), "KEY");
        let offsets = [
            None,
            Some((0, 5)),
            Some((5, 8)),
            Some((9, 14)),
            Some((15, 17)),
            Some((18, 21)),
            None,
            None,
        ];
        let tags = tag_tokens(&offsets, &marked.spans);
        let labels: Vec<String> = tags
            .iter()
            .map(|t| t.as_ref().map_or("-".into(), Tag::label))
            .collect();
        assert_eq!(
            labels,
            ["-", "B-KEY", "I-KEY", "I-KEY", "O", "B-KEY", "-", "-"]
        );
        // And back: the entities are the marked spans' tokens.
        assert_eq!(
            entities(&tags),
            [(1, 4, "KEY".to_string()), (5, 6, "KEY".to_string())]
        );
    }

    #[test]
    fn adjacent_spans_each_begin() {
        let spans = [
            Span {
                start: 0,
                end: 1,
                kind: String::new(),
            },
            Span {
                start: 2,
                end: 3,
                kind: String::new(),
            },
        ];
        let tags = tag_tokens(&[Some((0, 1)), Some((2, 3))], &spans);
        assert_eq!(
            tags,
            [
                Some(Tag::Begin(String::new())),
                Some(Tag::Begin(String::new()))
            ]
        );
    }

    /// seqeval's default mode on the sequences its README and conlleval use.
    #[test]
    fn entities_are_read_as_seqeval_reads_them() {
        let read = |labels: &[&str]| {
            let tags: Vec<Option<Tag>> = labels.iter().map(|l| Tag::parse(l)).collect();
            entities(&tags)
                .into_iter()
                .map(|(s, e, k)| format!("{k}:{s}-{e}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            read(&["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"]),
            ["MISC:3-6"]
        );
        assert_eq!(read(&["B-PER", "I-PER", "O"]), ["PER:0-2"]);
        // An I after O starts an entity; a change of type ends one and starts another.
        assert_eq!(
            read(&["O", "I-A", "I-A", "I-B", "B-B"]),
            ["A:1-3", "B:3-4", "B:4-5"]
        );
        // B after B: two entities.
        assert_eq!(read(&["B", "B", "I"]), [":0-1", ":1-3"]);
        assert_eq!(read(&["O", "O"]), Vec::<String>::new());
        assert_eq!(Tag::parse("X"), None);
        assert_eq!(Tag::parse("O-KEY"), None);
        for label in ["O", "B", "I", "B-KEY", "I-KEY"] {
            assert_eq!(Tag::parse(label).unwrap().label(), label);
        }
    }
}
