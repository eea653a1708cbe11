//! graft's SentencePiece reader against SentencePiece itself: small BPE models trained on
//! `../shared/data/abstracts/train.csv` with ChatGLM's trainer settings (and with SentencePiece's
//! defaults), 200 other lines encoded and decoded by both.
//!
//! Needs Python with the `sentencepiece` package: `$GRAFT_PYTHON`, else `python3` with
//! `target/spm-site` on its path, where `cargo xtask test` installs the package (pip
//! `--target`) before it runs the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use graft_tokenizer::{Padding, SentencePieceFlavour, TextTokenizer, CHATGLM_SPECIAL_TOKENS};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train_csv() -> PathBuf {
    let path = workspace().join("../shared/data/abstracts/train.csv");
    assert!(
        path.is_file(),
        "{} not found (expected ../shared next to the workspace)",
        path.display()
    );
    path
}

/// A Python with the `sentencepiece` package (see `xtask/src/main.rs`).
fn python() -> Command {
    graft_testkit::python_with("spm-site", "sentencepiece", "sentencepiece==0.2.2")
}

/// Runs `spm_reference.py` with `args`, failing with its output if it fails.
fn reference(args: &[&std::ffi::OsStr]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spm_reference.py");
    let mut python = python();
    let program = python.get_program().to_string_lossy().into_owned();
    let out = python
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}); if `sentencepiece` is missing, `cargo xtask test` installs \
         it\nstderr:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Reference {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    decoded: Vec<String>,
}

fn load_reference(path: &Path) -> Reference {
    let text = std::fs::read_to_string(path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let ids = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    Reference {
        texts: strings("texts"),
        ids,
        decoded: strings("decoded"),
    }
}

/// Encodes and decodes every reference text with `tok`; returns the texts that differ, with
/// both answers, and the count that matched.
fn compare(tok: &TextTokenizer, r: &Reference) -> (usize, Vec<String>) {
    let mut matched = 0;
    let mut diffs = Vec::new();
    for (i, text) in r.texts.iter().enumerate() {
        let ids = tok.encode_no_special(text).unwrap();
        let decoded = tok.decode(&r.ids[i]).unwrap();
        if ids == r.ids[i] && decoded == r.decoded[i] {
            matched += 1;
        } else {
            let first = ids
                .iter()
                .zip(&r.ids[i])
                .take_while(|(a, b)| a == b)
                .count();
            diffs.push(format!(
                "text {i} {text:?}: ids differ from position {first} (graft {:?}, \
                 sentencepiece {:?}); decoded equal: {}",
                &ids[first..ids.len().min(first + 8)],
                &r.ids[i][first..r.ids[i].len().min(first + 8)],
                decoded == r.decoded[i]
            ));
        }
    }
    (matched, diffs)
}

#[test]
fn trained_bpe_models_match_sentencepiece() {
    let dir = tempfile::tempdir().unwrap();
    reference(&[
        "train".as_ref(),
        train_csv().as_os_str(),
        dir.path().as_os_str(),
    ]);
    for name in ["chatglm_like", "nfkc_defaults"] {
        let model = dir.path().join(format!("{name}.model"));
        let r = load_reference(&dir.path().join(format!("{name}.json")));
        assert!(r.texts.len() > 200, "{name}: {} texts", r.texts.len());
        let plain = SentencePieceFlavour::Plain {
            add_bos: false,
            add_eos: false,
        };
        let tok = TextTokenizer::from_sentencepiece(&model, 1 << 16, Padding::Longest, plain)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (matched, diffs) = compare(&tok, &r);
        assert!(
            diffs.is_empty(),
            "{name}: {matched} of {} texts match SentencePiece:\n{}",
            r.texts.len(),
            diffs.join("\n")
        );
        eprintln!("{name}: {matched} of {} texts match", r.texts.len());

        // Found by content too, and with Llama's default of a BOS first.
        let renamed = dir.path().join(format!("{name}.bin"));
        std::fs::copy(&model, &renamed).unwrap();
        let tok = TextTokenizer::from_file(&renamed, 1 << 16, Padding::Longest).unwrap();
        assert_eq!(tok.token_to_id("<s>"), Some(1));
        let mut with_bos = vec![1];
        with_bos.extend(&r.ids[0]);
        assert_eq!(tok.encode(&r.texts[0]).unwrap(), with_bos);
        // SentencePiece does not read `</s>` in text as the control token; neither does graft.
        let spelled = r.texts.iter().position(|t| t.contains("</s>")).unwrap();
        assert_eq!(
            tok.encode_no_special(&r.texts[spelled]).unwrap(),
            r.ids[spelled]
        );
    }
}

#[test]
fn chatglm_tokenizer_config_adds_chatglm_tokens_and_prefix() {
    let dir = tempfile::tempdir().unwrap();
    reference(&[
        "train".as_ref(),
        train_csv().as_os_str(),
        dir.path().as_os_str(),
    ]);
    let model = dir.path().join("tokenizer.model");
    std::fs::rename(dir.path().join("chatglm_like.model"), &model).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"tokenizer_class": "ChatGLMTokenizer", "remove_space": false}"#,
    )
    .unwrap();
    let r = load_reference(&dir.path().join("chatglm_like.json"));
    let tok = TextTokenizer::from_file(&model, 4096, Padding::Longest).unwrap();
    let n = 3000u32; // the trained vocabulary
    for (i, token) in CHATGLM_SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(token), Some(n + i as u32), "{token}");
    }
    assert_eq!(tok.vocab_size(), 3009);
    // THUDM pads with the unknown piece.
    assert_eq!(tok.pad_id(), 0);
    // `[gMASK] sop` before every text, as THUDM's build_inputs_with_special_tokens does.
    let mut expected = vec![n + 1, n + 3];
    expected.extend(&r.ids[0]);
    assert_eq!(tok.encode(&r.texts[0]).unwrap(), expected);
    // The special tokens spelled in text stay text, as in THUDM's tokenizer.
    let spelled = r.texts.iter().position(|t| t.contains("[gMASK]")).unwrap();
    assert_eq!(
        tok.encode_no_special(&r.texts[spelled]).unwrap(),
        r.ids[spelled]
    );
    // And decoding leaves them out.
    assert_eq!(tok.decode(&expected).unwrap(), r.decoded[0]);
}

/// ChatGLM's own tokenizer.model, where one is at hand: `$GRAFT_CHATGLM_TOKENIZER`, else
/// `../shared/models/chatglm2-6b/tokenizer.model`. Ignored by default: no registry ships it.
#[test]
#[ignore = "needs ChatGLM's tokenizer.model: set GRAFT_CHATGLM_TOKENIZER and run with --ignored"]
fn chatglm_tokenizer_model_matches_sentencepiece() {
    let model = match std::env::var_os("GRAFT_CHATGLM_TOKENIZER") {
        Some(p) => PathBuf::from(p),
        None => workspace().join("../shared/models/chatglm2-6b/tokenizer.model"),
    };
    assert!(
        model.is_file(),
        "ChatGLM tokenizer.model not found at {}: set GRAFT_CHATGLM_TOKENIZER",
        model.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reference.json");
    reference(&[
        "encode".as_ref(),
        model.as_os_str(),
        train_csv().as_os_str(),
        out.as_os_str(),
    ]);
    let r = load_reference(&out);
    let tok = TextTokenizer::from_sentencepiece(
        &model,
        1 << 16,
        Padding::Longest,
        SentencePieceFlavour::ChatGlm,
    )
    .unwrap();
    let (matched, diffs) = compare(&tok, &r);
    eprintln!("{matched} of {} lines match", r.texts.len());
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
