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
            // Whatever parses also validates and round-trips.
            prop_assert!(config.validate().is_ok());
            prop_assert!(TrainConfig::from_toml(&config.to_toml().unwrap()).is_ok());
        }
    }
}
