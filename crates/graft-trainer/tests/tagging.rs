//! Tagging data labelled per token with MiniLM's WordPiece tokenizer.
use graft_tokenizer::{LabelSet, Padding, Template, TextTokenizer};
use graft_trainer::data::Dataset;
use graft_trainer::tagging::{label_tokens, mark_rows, IGNORED};

fn tokenizer(max_len: usize) -> TextTokenizer {
    let dir = graft_model::zoo::MINILM
        .ensure(&mut |m| eprintln!("{m}"))
        .unwrap();
    TextTokenizer::from_file(&dir.join("tokenizer.json"), max_len, Padding::Longest).unwrap()
}

fn labels(names: &[&str]) -> LabelSet {
    LabelSet::new(names.iter().map(|s| s.to_string()).collect()).unwrap()
}

fn rows() -> graft_trainer::tagging::Marking {
    let data = Dataset::parse_csv(
        std::path::Path::new("t.csv"),
        "text,phrases\nDye-sensitized solar cells outperform silicon,solar cells; silicon\n"
            .as_bytes(),
        &[],
    )
    .unwrap();
    mark_rows(&data, &Template::parse("{text}").unwrap(), "phrases", "").unwrap()
}

#[test]
fn tokens_take_the_label_of_their_span_and_special_tokens_none() {
    let marking = rows();
    let row = &marking.rows[0];
    let labelled = label_tokens(&tokenizer(64), &labels(&["O", "B", "I"]), row).unwrap();
    let tokenizer = tokenizer(64);
    let pieces: Vec<String> = labelled
        .ids
        .iter()
        .map(|&id| tokenizer.decode(&[id]).unwrap())
        .collect();
    eprintln!("{pieces:?} {:?}", labelled.labels);
    assert_eq!(labelled.ids.len(), labelled.labels.len());
    assert_eq!(labelled.labels[0], IGNORED);
    assert_eq!(*labelled.labels.last().unwrap(), IGNORED);
    // "solar cells" is B I, "silicon" B; "dye - sensitized" and "outperform" O.
    let tagged: Vec<(String, i64)> = pieces
        .iter()
        .cloned()
        .zip(labelled.labels.iter().copied())
        .filter(|(_, l)| *l > 0)
        .collect();
    assert_eq!(
        tagged,
        [
            ("solar".to_string(), 1),
            ("cells".to_string(), 2),
            ("silicon".to_string(), 1)
        ]
    );
    assert_eq!(labelled.cut, 0);
}

#[test]
fn a_tag_outside_the_label_set_is_refused_and_truncation_is_counted() {
    let marking = rows();
    let row = &marking.rows[0];
    let e = label_tokens(&tokenizer(64), &labels(&["O", "B-KEY", "I-KEY"]), row)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 2") && e.contains("\"B\""), "{e}");
    // Six tokens: [CLS], dye, -, sensitized, solar, [SEP]: both phrases are cut.
    let short = label_tokens(&tokenizer(6), &labels(&["O", "B", "I"]), row).unwrap();
    assert_eq!(short.ids.len(), 6);
    assert_eq!(short.cut, 2);
}
