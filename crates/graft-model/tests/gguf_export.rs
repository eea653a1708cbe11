//! GGUF export (`formats::gguf_export`): graft reading back its own export gives the model it
//! wrote, the metadata is llama.cpp's, and what cannot be exported is refused by name.
//! (llama.cpp running the exports is graft-cli's `tests/gguf_export.rs`.)
mod common;
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device};
use common::{all_logits, max_abs_diff, shared_model};
use graft_model::decoder::Decoder;
use graft_model::formats::gguf_export::{write_gguf, GgufType, TokenizerMetadata};
use graft_model::NoHooks;
use std::path::{Path, PathBuf};

fn stories260k() -> PathBuf {
    shared_model("stories260K")
}

fn smollm2() -> PathBuf {
    graft_model::zoo::SMOLLM2
        .ensure(&mut |m| eprintln!("{m}"))
        .expect("SmolLM2 (run `cargo xtask fetch-model smollm2`)")
        .join(graft_model::zoo::SMOLLM2_GGUF)
}

/// `model` exported in `ty` to `path` with `tokenizer`, then read back by graft in f32.
fn round_trip(
    model: &Decoder,
    tokenizer: &TokenizerMetadata,
    ty: GgufType,
    path: &Path,
) -> Decoder {
    write_gguf(model, &NoHooks, tokenizer, "test", ty, path).unwrap();
    Decoder::open(path, DType::F32, &Device::Cpu).unwrap()
}

fn metadata(path: &Path) -> Content {
    Content::read(&mut std::fs::File::open(path).unwrap()).unwrap()
}

/// A f16 export read back gives the original logits up to f16's rounding of the weights, and
/// exporting that read-back model again changes no bit: the Q/K permutation the writer applies
/// is exactly the one the reader undoes.
fn check_round_trip(model: &Decoder, tokenizer: &TokenizerMetadata, ids: &[u32], bound: f32) {
    let dir = tempfile::tempdir().unwrap();
    let once = round_trip(
        model,
        tokenizer,
        GgufType::F16,
        &dir.path().join("once.gguf"),
    );
    let (original, read) = (all_logits(model, ids), all_logits(&once, ids));
    let diff = max_abs_diff(&original, &read);
    assert!(
        diff <= bound,
        "read-back logits differ by {diff} (bound {bound})"
    );
    let twice = round_trip(
        &once,
        tokenizer,
        GgufType::F16,
        &dir.path().join("twice.gguf"),
    );
    assert_eq!(max_abs_diff(&read, &all_logits(&twice, ids)), 0.0);
    let (a, b) = (
        std::fs::read(dir.path().join("once.gguf")).unwrap(),
        std::fs::read(dir.path().join("twice.gguf")).unwrap(),
    );
    assert!(a == b, "the second export differs from the first");
}

/// A Llama-family model of config.json `json` with random weights, and the folder holding it.
fn random_llama(json: &serde_json::Value) -> (tempfile::TempDir, Decoder) {
    let folder = tempfile::tempdir().unwrap();
    let config: graft_model::models::llama::Config = serde_json::from_value(json.clone()).unwrap();
    graft_model::models::llama::plan(&config)
        .unwrap()
        .write_random(folder.path(), json, 1)
        .unwrap();
    let model = Decoder::open(folder.path(), DType::F32, &Device::Cpu).unwrap();
    (folder, model)
}

#[test]
fn smollm2_exports_and_reads_back_to_its_logits() {
    let path = smollm2();
    let model = Decoder::open(&path, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = TokenizerMetadata::from_gguf(&path).unwrap();
    // "The capital of France is Paris." in SmolLM2's vocabulary.
    let ids = [504, 3575, 282, 4649, 314, 7042, 30];
    // Measured: 0.031.
    check_round_trip(&model, &tokenizer, &ids, 0.05);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4_k.gguf");
    let written = write_gguf(
        &model,
        &NoHooks,
        &tokenizer,
        "smol",
        "q4_k".parse().unwrap(),
        &out,
    )
    .unwrap();
    // Rows 576 wide (every matrix but ffn_down's, 1536) are no multiple of 256: q5_0.
    let counts: Vec<(&str, usize)> = written
        .formats
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(counts, [("f32", 61), ("q4_k", 30), ("q5_0", 181)]);
    let content = metadata(&out);
    let u32_of = |key: &str| content.metadata[key].to_u32().unwrap();
    assert_eq!(
        content.metadata["general.architecture"]
            .to_string()
            .unwrap(),
        "llama"
    );
    assert_eq!(u32_of("llama.block_count"), 30);
    assert_eq!(u32_of("llama.attention.head_count_kv"), 3);
    assert_eq!(u32_of("llama.rope.dimension_count"), 64);
    assert_eq!(u32_of("llama.vocab_size"), 49152);
    assert_eq!(
        content.metadata["llama.rope.freq_base"].to_f32().unwrap(),
        1e5
    );
    assert_eq!(
        content.metadata["tokenizer.ggml.pre"].to_string().unwrap(),
        "smollm"
    );
    assert!(content.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .contains("<|im_start|>"));
    // Tied embeddings: no output.weight; norms in f32.
    assert!(!content.tensor_infos.contains_key("output.weight"));
    let norm = &content.tensor_infos["blk.0.attn_norm.weight"];
    assert_eq!(norm.ggml_dtype, candle_core::quantized::GgmlDType::F32);
}

#[test]
fn stories260k_exports_with_its_sentencepiece_tokenizer() {
    let model = Decoder::open(&stories260k(), DType::F32, &Device::Cpu).unwrap();
    let tokenizer = TokenizerMetadata::from_folder(&stories260k().join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.token_count(), Some(512));
    let text = |key: &str| tokenizer.get(key).unwrap().to_string().unwrap().clone();
    assert_eq!(text("tokenizer.ggml.model"), "llama");
    let id = |key: &str| tokenizer.get(key).unwrap().to_u32().unwrap();
    assert_eq!(
        (
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id")
        ),
        (1, 2)
    );
    // Measured: 0.011.
    check_round_trip(
        &model,
        &tokenizer,
        &[1, 403, 407, 261, 378, 280, 65, 32],
        0.03,
    );
}

#[test]
fn what_llama_cpp_would_misread_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let small = |model_type: &str| {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 512, "hidden_size": 48,
            "intermediate_size": 80, "num_hidden_layers": 1, "num_attention_heads": 6,
            "num_key_value_heads": 2, "tie_word_embeddings": true,
        })
    };
    let tokenizer = TokenizerMetadata::from_folder(&stories260k().join("tokenizer.json")).unwrap();
    let export = |json: serde_json::Value| {
        let (_folder, model) = random_llama(&json);
        let out = dir.path().join("out.gguf");
        let e = write_gguf(&model, &NoHooks, &tokenizer, "t", GgufType::F16, &out).unwrap_err();
        assert!(!out.exists());
        e.to_string()
    };
    let mut scaled = small("qwen2");
    scaled["rope_scaling"] = serde_json::json!({ "rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192 });
    let e = export(scaled);
    assert!(e.contains("qwen2 has no Llama 3.1 rope scaling"), "{e}");
    // A table wider than the vocabulary is padded with unused tokens; a narrower one cannot be.
    let mut narrower = small("llama");
    narrower["vocab_size"] = 400.into();
    let e = export(narrower);
    assert!(
        e.contains("512 tokens and the embedding table 400 rows"),
        "{e}"
    );
    let mut biased = small("llama");
    biased["attention_bias"] = true.into();
    let e = export(biased);
    assert!(
        e.contains("q_proj.bias") && e.contains("no counterpart in llama.cpp's `llama`"),
        "{e}"
    );
    // A byte-level BPE tokenizer needs a pre-tokenizer name graft cannot derive.
    let smollm = shared_model("smollm2-135m-instruct").join("tokenizer.json");
    let e = TokenizerMetadata::from_folder(&smollm)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("only SentencePiece-style BPE") && e.contains("Qwen2's pre-tokenizer"),
        "{e}"
    );
    assert!("q5_k"
        .parse::<GgufType>()
        .unwrap_err()
        .to_string()
        .contains("f16, q8_0, q4_k"));
}

/// Llama 3.1's rope scaling becomes llama.cpp's `rope_freqs` tensor: the factor each rotary
/// frequency is divided by, 1 for short wavelengths and `factor` for long ones, blended between.
/// graft's reader refuses such a file rather than run it unscaled.
#[test]
fn llama3_rope_scaling_becomes_rope_freqs() {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 500000.0, "tie_word_embeddings": true,
        "rope_scaling": { "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192 },
    });
    let (folder, model) = random_llama(&json);
    let tokenizer = TokenizerMetadata::from_folder(&stories260k().join("tokenizer.json")).unwrap();
    let out = folder.path().join("scaled.gguf");
    write_gguf(&model, &NoHooks, &tokenizer, "t", GgufType::F16, &out).unwrap();
    let content = metadata(&out);
    let mut file = std::fs::File::open(&out).unwrap();
    let factors: Vec<f32> = content
        .tensor(&mut file, "rope_freqs.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    // Head 16 wide: 8 frequencies, wavelengths from 2 pi to about 6e5 positions.
    assert_eq!(factors.len(), 8);
    assert_eq!((factors[0], factors[7]), (1.0, 8.0), "{factors:?}");
    assert!(factors.windows(2).all(|w| w[0] <= w[1]), "{factors:?}");
    let e = Decoder::open(&out, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rope_freqs.weight"), "{e}");
}
