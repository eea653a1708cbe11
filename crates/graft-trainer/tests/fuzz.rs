//! Bounded fuzzing of the parsers that read user files: CSV and JSONL data, and training
//! configs. Random bytes and random edits of valid inputs must give `Ok` or an error, never a
//! panic. The case counts bound the time (seconds on two cores).
use graft_trainer::data::Dataset;
use graft_trainer::TrainConfig;
use proptest::prelude::*;
use std::path::Path;

const CSV: &str = "uuid,title,author,abstract,Keywords,label\n\
1,\"A, quoted\"\"title\",Ann,An abstract.,k,1\n\
2,Plain,Bob,\"Two\nlines\",k,0\n";

const JSONL: &str = "{\"title\": \"A\", \"abstract\": \"B\", \"label\": 1}\n\
{\"title\": \"C\", \"abstract\": \"D\\u00e9\", \"label\": \"0\"}\n";

const TOML: &str = "[model]\nmax_len = 64\n[data]\nlabels = [\"0\", \"1\"]\n\
[train]\nlr = 1e-3\nbatch_size = 4\nschedule = \"cosine\"\n\
[method]\nname = \"lora\"\nr = 4\ntarget_modules = [\"query\"]\n";

/// Edits of a valid input: each (position, byte, insert) overwrites or inserts a byte, biased
/// towards the characters that matter to the formats.
fn mutate(base: &str, edits: &[(usize, u8, bool)]) -> Vec<u8> {
    const SPECIAL: &[u8] = b"\",\n\r\\{}[]:=#'\xff\xc3\x00 ";
    let mut bytes = base.as_bytes().to_vec();
    for &(position, byte, insert) in edits {
        let at = position % (bytes.len() + 1);
        let b = if byte < 128 {
            SPECIAL[byte as usize % SPECIAL.len()]
        } else {
            byte
        };
        if insert || at == bytes.len() {
            bytes.insert(at, b);
        } else {
            bytes[at] = b;
        }
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, bool)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 0..12)
}

const REQUIRED: &[&str] = &["title", "abstract", "label"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn csv_reader_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Dataset::parse_csv(Path::new("fuzz.csv"), &bytes, REQUIRED);
    }

    #[test]
    fn csv_reader_never_panics_on_edited_files(edits in edits()) {
        let bytes = mutate(CSV, &edits);
        if let Ok(data) = Dataset::parse_csv(Path::new("fuzz.csv"), &bytes, REQUIRED) {
            for record in &data.records {
                prop_assert_eq!(record.fields.len(), data.columns.len());
            }
        }
    }

    #[test]
    fn jsonl_reader_never_panics(edits in edits(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Dataset::parse_jsonl(Path::new("fuzz.jsonl"), &bytes, REQUIRED);
        let edited = mutate(JSONL, &edits);
        if let Ok(data) = Dataset::parse_jsonl(Path::new("fuzz.jsonl"), &edited, REQUIRED) {
            for record in &data.records {
                prop_assert_eq!(record.fields.len(), data.columns.len());
            }
        }
    }

    #[test]
    fn config_parser_never_panics(edits in edits(), text in "\\PC{0,200}") {
        let _ = TrainConfig::from_toml(&text);
        let edited = String::from_utf8_lossy(&mutate(TOML, &edits)).into_owned();
        if let Ok(config) = TrainConfig::from_toml(&edited) {
            // Whatever is accepted is usable by the trainer and round-trips unchanged.
            prop_assert_eq!(usable(&config), Ok(()));
            let again = TrainConfig::from_toml(&config.to_toml().unwrap());
            prop_assert_eq!(again.ok(), Some(config));
        }
    }

    /// Every numeric field at its edges: accepted exactly when the trainer can use it.
    #[test]
    fn config_is_accepted_exactly_when_usable(
        values in proptest::collection::vec(proptest::sample::select(EDGES), FIELDS.len()),
        labels in proptest::sample::select(&["[]", "[\"0\"]", "[\"0\", \"0\"]", "[\"0\", \"1\"]"][..]),
    ) {
        // Lines per section: TOML forbids a table twice.
        let mut sections: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        sections.entry("data").or_default().push(format!("labels = {labels}"));
        for (&(section, key, integer), value) in FIELDS.iter().zip(&values) {
            // Integer fields take the edges that are integers; others keep their default.
            let literal = match (integer, value.parse::<i64>()) {
                (true, Ok(n)) if n >= 0 => n.to_string(),
                (true, _) => continue,
                (false, _) => value.to_string(),
            };
            sections.entry(section).or_default().push(format!("{key} = {literal}"));
        }
        let text: String = sections
            .iter()
            .map(|(section, lines)| format!("[{section}]\n{}\n", lines.join("\n")))
            .collect();
        let raw: TrainConfig = toml::from_str(&text).unwrap();
        let accepted = TrainConfig::from_toml(&text);
        prop_assert_eq!(accepted.is_ok(), usable(&raw).is_ok(), "{}\n{:?}", text, accepted.err());
    }
}

/// Values at the edges of what the numeric fields accept (TOML literals).
const EDGES: &[&str] = &[
    "0", "1", "2", "-1", "0.0", "0.5", "1.0", "-0.5", "1e-3", "nan", "inf", "-inf",
];

/// (section, key, is an integer field).
const FIELDS: &[(&str, &str, bool)] = &[
    ("train", "epochs", true),
    ("train", "max_steps", true),
    ("train", "batch_size", true),
    ("train", "grad_accum", true),
    ("train", "eval_batch_size", true),
    ("train", "lr", false),
    ("train", "head_lr", false),
    ("train", "weight_decay", false),
    ("train", "beta1", false),
    ("train", "beta2", false),
    ("train", "eps", false),
    ("train", "warmup_ratio", false),
    ("train", "max_grad_norm", false),
    ("model", "max_len", true),
    ("data", "val_fraction", false),
];

/// What training needs of a config, stated apart from `validate()`: every divisor and count at
/// least 1, rates and the optimiser's constants in their ranges, finite, and at least two
/// distinct labels.
fn usable(config: &TrainConfig) -> Result<(), String> {
    let t = &config.train;
    let finite_positive = |v: f64| v.is_finite() && v > 0.0;
    let unit = |v: f64| (0.0..1.0).contains(&v);
    let mut labels = config.data.labels.clone();
    labels.sort();
    labels.dedup();
    let rules = [
        ("batch_size", t.batch_size >= 1),
        ("grad_accum", t.grad_accum >= 1),
        ("eval_batch_size", t.eval_batch_size >= 1),
        ("steps", t.epochs >= 1 || t.max_steps >= 1),
        ("lr", finite_positive(t.lr)),
        ("head_lr", t.head_lr.is_none_or(finite_positive)),
        (
            "weight_decay",
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
        ),
        ("betas", unit(t.beta1) && unit(t.beta2)),
        ("eps", finite_positive(t.eps)),
        ("warmup_ratio", unit(t.warmup_ratio)),
        (
            "max_grad_norm",
            t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0,
        ),
        ("max_len", config.model.max_len >= 1),
        (
            "val_fraction",
            config.data.val_fraction > 0.0 && config.data.val_fraction < 1.0,
        ),
        (
            "labels",
            labels.len() >= 2 && labels.len() == config.data.labels.len(),
        ),
    ];
    match rules.iter().find(|(_, ok)| !ok) {
        Some((name, _)) => Err(format!("{name} unusable")),
        None => Ok(()),
    }
}
