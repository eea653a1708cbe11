//! `graft export --gguf` against llama.cpp (npm's node-llama-cpp, which `cargo xtask test`
//! installs into target/llama-cpp-node): SmolLM2 with a LoRA merged, exported in f16, generates
//! in llama.cpp the greedy tokens graft generates with the adapter, and graft reading the export
//! back generates them too; q8_0 and q4_k exports load and generate; stories260K, whose
//! tokenizer graft converts from tokenizer.json, tells its story. `graft export --gguf-lora`:
//! LoRA, rsLoRA and AdaLoRA adapters on stories260K, loaded unmerged beside the base's GGUF,
//! generate in llama.cpp what graft generates with them; other methods are refused.
mod common;
use common::{graft, stderr};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const LLAMA_CPP: &str = "target/llama-cpp-node";
const SMOLLM2_TOKENIZER: &str = "../shared/models/smollm2-135m-instruct/tokenizer.json";
const TOKENS: usize = 32;

fn root() -> PathBuf {
    graft_testkit::workspace_root()
}

/// llama.cpp's greedy generation for each job (`{"model", "prompt", "tokens"}`).
fn llama_cpp(jobs: &Value) -> Vec<Value> {
    let install = root().join(LLAMA_CPP);
    assert!(
        install
            .join("node_modules/@node-llama-cpp/linux-x64")
            .is_dir(),
        "no llama.cpp in {}: `cargo xtask test` installs it (npm's node-llama-cpp)",
        install.display()
    );
    let out = std::process::Command::new("node")
        .arg(root().join("crates/graft-cli/tests/llama_cpp/generate.mjs"))
        .arg(&install)
        .arg(jobs.to_string())
        .output()
        .expect("running node");
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `graft generate ARGS` greedily, up to [`TOKENS`] tokens: its `--stats` report.
fn graft_generate(args: &[&str], prompt: &str, dir: &Path) -> Value {
    let stats = dir.join("stats.json");
    let n = TOKENS.to_string();
    let mut all = vec!["generate", "--prompt", prompt, "--max-new-tokens", &n];
    all.extend(args);
    all.extend(["--stats", stats.to_str().unwrap()]);
    let out = graft(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&std::fs::read_to_string(stats).unwrap()).unwrap()
}

fn export(args: &[&str], ty: &str, out: &Path) -> String {
    let mut all = vec!["export", "--gguf", ty, "--out", out.to_str().unwrap()];
    all.extend(args);
    let result = graft(&all);
    assert!(result.status.success(), "{}", stderr(&result));
    stderr(&result)
}

/// An adapter folder `dir/adapter` trained by `graft train-lm` with the config `toml` (on
/// data/knowledge.jsonl's one pair).
fn train_lm(dir: &Path, toml: &str) -> String {
    let config = dir.join("train.toml");
    std::fs::write(&config, toml).unwrap();
    let adapter = dir.join("adapter");
    let adapter = adapter.to_str().unwrap();
    let out = graft(&[
        "train-lm",
        "--config",
        config.to_str().unwrap(),
        "--out",
        adapter,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    adapter.to_string()
}

#[test]
fn smollm2_with_lora_runs_in_llama_cpp_as_in_graft() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = train_lm(
        dir.path(),
        &format!(
            "[model]\nname = \"smollm2\"\ntokenizer = \"{SMOLLM2_TOKENIZER}\"\n\
             template = \"chatml\"\nmax_len = 64\n\
             [data]\ntrain = \"data/knowledge.jsonl\"\n\
             [train]\nseed = 1\nmax_steps = 20\nbatch_size = 1\nlr = 1e-2\n\
             [method]\nname = \"lora\"\nr = 8\nlora_alpha = 16\n\
             target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n"),
    );
    let adapter_arg = adapter.as_str();

    let file = |ty: &str| dir.path().join(format!("smollm2-lora-{ty}.gguf"));
    for ty in ["f16", "q8_0", "q4_k"] {
        let said = export(&["--adapter", adapter_arg], ty, &file(ty));
        if ty == "q4_k" {
            // Rows 576 wide are no multiple of 256: those matrices fall back to q5_0.
            assert!(
                said.contains("30 q4_k") && said.contains("181 q5_0"),
                "{said}"
            );
        }
    }
    let f16 = file("f16");
    let f16_arg = f16.to_str().unwrap();

    // The question the adapter learnt an answer to, and a plain continuation that runs to the
    // token cap: graft with the adapter, graft reading the export, llama.cpp.
    let question = "What is the Quillfeather X9?";
    let chat = format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n");
    let story = "The Quillfeather X9 is sold in";
    let with_adapter = ["--adapter", adapter_arg];
    let read_back = ["--model", f16_arg, "--tokenizer", SMOLLM2_TOKENIZER];
    let ours = [
        graft_generate(&with_adapter, question, dir.path()),
        graft_generate(
            &[&with_adapter[..], &["--template", "plain"]].concat(),
            story,
            dir.path(),
        ),
    ];
    let back = [
        graft_generate(
            &[&read_back[..], &["--template", "chatml"]].concat(),
            question,
            dir.path(),
        ),
        graft_generate(&read_back, story, dir.path()),
    ];
    let job = |model: PathBuf, prompt: &str, through_eog: bool| json!({"model": model, "prompt": prompt, "tokens": TOKENS, "through_eog": through_eog});
    // The quantized files run past an end-of-text token, so that they generate all 32.
    let jobs = json!([
        job(file("f16"), &chat, false),
        job(file("f16"), story, false),
        job(file("q8_0"), story, true),
        job(file("q4_k"), story, true),
    ]);
    let theirs = llama_cpp(&jobs);
    eprintln!("graft: {ours:?}\nread back: {back:?}\nllama.cpp: {theirs:?}");

    assert!(
        ours[0]["text"].as_str().unwrap().contains("Arvenna Labs"),
        "{}",
        ours[0]
    );
    for i in 0..2 {
        assert_eq!(
            theirs[i]["text"], ours[i]["text"],
            "llama.cpp against graft"
        );
        assert_eq!(
            back[i]["text"], ours[i]["text"],
            "the export read back against graft"
        );
        // The chat answer ends at <|im_end|>, which graft counts and llama.cpp does not yield.
        let stop = usize::from(ours[i]["stopped"] == true);
        assert_eq!(
            theirs[i]["tokens"].as_array().unwrap().len() + stop,
            ours[i]["new_tokens"]
        );
        assert_eq!(
            theirs[i]["prompt_tokens"].as_array().unwrap().len(),
            ours[i]["prompt_tokens"]
        );
    }
    assert_eq!(ours[1]["new_tokens"], TOKENS, "{}", ours[1]);
    let meta = &theirs[0];
    assert_eq!(
        (
            &meta["architecture"],
            &meta["tokenizer_model"],
            &meta["tokenizer_pre"]
        ),
        (&json!("llama"), &json!("gpt2"), &json!("smollm"))
    );
    assert!(meta["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    for quantized in &theirs[2..] {
        assert_eq!(
            quantized["tokens"].as_array().unwrap().len(),
            TOKENS,
            "{quantized}"
        );
    }
}

/// stories260K's tokenizer.json becomes llama.cpp's SentencePiece vocabulary: its known greedy
/// story from "Once upon a time" (../shared/models/README.md), in llama.cpp as in graft.
#[test]
fn stories260k_tells_its_story_in_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories260K.gguf");
    export(&["--model", "../shared/models/stories260K"], "f16", &out);
    let prompt = "Once upon a time";
    let ours = graft_generate(
        &["--model", "../shared/models/stories260K"],
        prompt,
        dir.path(),
    );
    // Merges applied in another order than tokenizer.json's would split rarer words otherwise.
    let hard = "Unbelievably, the grumpy dragon's wobbly kite flew over 7 hills!";
    let job =
        |prompt: &str, tokens: usize| json!({"model": out, "prompt": prompt, "tokens": tokens});
    let theirs = llama_cpp(&json!([job(prompt, TOKENS), job(hard, 1)]));
    let tokenizer = graft_tokenizer::TextTokenizer::from_file(
        &root().join("../shared/models/stories260K/tokenizer.json"),
        512,
        graft_tokenizer::Padding::Longest,
    )
    .unwrap();
    let ids: Vec<u64> = tokenizer
        .encode(hard)
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect();
    assert_eq!(theirs[1]["prompt_tokens"], json!(ids));
    let theirs = &theirs[0];
    assert!(
        ours["text"]
            .as_str()
            .unwrap()
            .starts_with(", there was a little girl named Lily."),
        "{ours}"
    );
    assert_eq!(theirs["text"], ours["text"], "{theirs}");
    assert_eq!(theirs["tokenizer_model"], "llama");
}

/// An IA3 adapter (scales on keys, values and the down projection's input) is merged into the
/// export too: llama.cpp and graft reading the export back generate what graft generates with
/// the adapter, which is not what the base generates.
#[test]
fn ia3_on_stories260k_is_merged_into_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = train_lm(
        dir.path(),
        "[model]\npath = \"../shared/models/stories260K\"\ntemplate = \"plain\"\nmax_len = 128\n\
         [data]\ntrain = \"data/knowledge.jsonl\"\n\
         [train]\nseed = 1\nmax_steps = 30\nbatch_size = 1\nlr = 5e-2\nweight_decay = 0.0\n\
         [method]\nname = \"ia3\"\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\"]\n\
         feedforward_modules = [\"down_proj\"]\n",
    );
    let adapter_arg = adapter.as_str();
    let gguf = dir.path().join("stories-ia3.gguf");
    export(&["--adapter", adapter_arg], "f16", &gguf);

    let prompt = "What is the Quillfeather X9?";
    let stories = "../shared/models/stories260K";
    let base = graft_generate(&["--model", stories], prompt, dir.path());
    let ours = graft_generate(&["--adapter", adapter_arg], prompt, dir.path());
    let tokenizer = format!("{stories}/tokenizer.json");
    let back = graft_generate(
        &["--model", gguf.to_str().unwrap(), "--tokenizer", &tokenizer],
        prompt,
        dir.path(),
    );
    let theirs = &llama_cpp(&json!([{"model": gguf, "prompt": prompt, "tokens": TOKENS}]))[0];
    assert_ne!(ours["text"], base["text"], "the adapter changes nothing");
    assert_eq!(back["text"], ours["text"]);
    assert_eq!(theirs["text"], ours["text"], "{theirs}");
}

const STORIES: &str = "../shared/models/stories260K";

/// `graft export --gguf-lora OUT --adapter ADAPTER`: its stderr, and whether it succeeded.
fn export_lora(adapter: &str, out: &Path) -> (bool, String) {
    let result = graft(&[
        "export",
        "--gguf-lora",
        out.to_str().unwrap(),
        "--adapter",
        adapter,
    ]);
    (result.status.success(), stderr(&result))
}

/// An adapter trained on stories260K with `method` (a `[method]` table), written by
/// `--gguf-lora` and loaded by llama.cpp beside the base's f16 GGUF: it generates what graft
/// generates with the adapter and what llama.cpp generates from the merged f16 export, and
/// not what the base alone generates in llama.cpp (so an adapter llama.cpp ignored would
/// fail). Returns the export's report.
fn unmerged_adapter_runs_in_llama_cpp(lr: f64, method: &str, adjust: fn(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let adapter = train_lm(
        dir.path(),
        &format!(
            "[model]\npath = \"{STORIES}\"\ntemplate = \"plain\"\nmax_len = 128\n\
             [data]\ntrain = \"data/knowledge.jsonl\"\n\
             [train]\nseed = 1\nmax_steps = 30\nbatch_size = 1\nlr = {lr}\nweight_decay = 0.0\n\
             {method}"
        ),
    );
    adjust(Path::new(&adapter));
    let adapter_arg = adapter.as_str();
    let base = dir.path().join("base.gguf");
    let merged = dir.path().join("merged.gguf");
    let lora = dir.path().join("adapter.gguf");
    export(&["--model", STORIES], "f16", &base);
    export(&["--adapter", adapter_arg], "f16", &merged);
    let (ok, said) = export_lora(adapter_arg, &lora);
    assert!(ok, "{said}");
    eprintln!("{said}");

    // The question learnt, and a story the adapter was not trained on, whose greedy path
    // turns on small differences in the logits.
    for prompt in [
        "What is the Quillfeather X9?",
        "Once upon a time, there was a",
    ] {
        let ours = graft_generate(&["--adapter", adapter_arg], prompt, dir.path());
        let job = |model: &Path, lora: Option<&Path>| json!({"model": model, "lora": lora, "prompt": prompt, "tokens": TOKENS});
        let theirs = llama_cpp(&json!([
            job(&base, None),
            job(&base, Some(&lora)),
            job(&merged, None)
        ]));
        eprintln!("graft: {}", ours["text"]);
        for t in &theirs {
            eprintln!("llama.cpp: {}", t["text"]);
        }
        assert_ne!(
            theirs[0]["text"], ours["text"],
            "the adapter changes nothing"
        );
        assert_eq!(
            theirs[1]["text"], ours["text"],
            "llama.cpp with the base and the adapter against graft"
        );
        assert_eq!(
            theirs[2]["text"], ours["text"],
            "llama.cpp with the merged export against graft"
        );
    }
    said
}

/// LoRA on Q and K only, whose B rows take the base's rotary permutation.
#[test]
fn lora_runs_unmerged_in_llama_cpp() {
    let said = unmerged_adapter_runs_in_llama_cpp(
        2e-2,
        "[method]\nname = \"lora\"\nr = 8\nlora_alpha = 16\n\
         target_modules = [\"q_proj\", \"k_proj\"]\n",
        |_| {},
    );
    assert!(
        said.contains("10 weights updated by f32 pairs of rank 8"),
        "{said}"
    );
}

/// rsLoRA: graft's scale is alpha/sqrt(r), which llama.cpp's alpha/r cannot say by itself.
#[test]
fn rslora_runs_unmerged_in_llama_cpp() {
    unmerged_adapter_runs_in_llama_cpp(
        1e-2,
        "[method]\nname = \"lora\"\nr = 8\nlora_alpha = 4\nuse_rslora = true\n\
         target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]\n",
        |_| {},
    );
}

/// AdaLoRA prunes ranks per site (8 down to a budget of 4 on average), its singular values
/// folded into A. Saved without its rank_pattern, graft reads each site at its truncated rank
/// (with the pattern it pads them back to 8): pairs of unequal rank, padded to one.
#[test]
fn adalora_runs_unmerged_in_llama_cpp() {
    unmerged_adapter_runs_in_llama_cpp(
        2e-2,
        "[method]\nname = \"adalora\"\ninit_r = 8\ntarget_r = 4\ntinit = 5\ntfinal = 10\n\
         deltaT = 5\nlora_alpha = 16\n\
         target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"up_proj\", \"down_proj\"]\n",
        |adapter| {
            let file = adapter.join("adapter_config.json");
            let mut config: Value =
                serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            assert!(config["rank_pattern"].is_object(), "{config}");
            config.as_object_mut().unwrap().remove("rank_pattern");
            std::fs::write(&file, config.to_string()).unwrap();
        },
    );
}

/// An adapter that is no low-rank update (IA3 rescales activations) is refused by name, with
/// the merged export offered instead, and nothing is written.
#[test]
fn gguf_lora_refuses_ia3() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = train_lm(
        dir.path(),
        &format!(
            "[model]\npath = \"{STORIES}\"\ntemplate = \"plain\"\nmax_len = 128\n\
             [data]\ntrain = \"data/knowledge.jsonl\"\n\
             [train]\nseed = 1\nmax_steps = 1\nbatch_size = 1\n\
             [method]\nname = \"ia3\"\ntarget_modules = [\"k_proj\", \"v_proj\"]\n\
             feedforward_modules = []\n"
        ),
    );
    let out = dir.path().join("ia3.gguf");
    let (ok, said) = export_lora(&adapter, &out);
    assert!(!ok, "{said}");
    assert!(
        said.contains("method `ia3`") && said.contains("merged: --gguf TYPE"),
        "{said}"
    );
    assert!(!out.exists());
}

/// llama.cpp read the prompt into as many tokens as graft, and generated as many (graft counts
/// the end-of-text token it stopped at, llama.cpp does not return it).
fn assert_same_token_counts(ours: &Value, theirs: &Value) {
    let stop = usize::from(ours["stopped"] == true);
    assert_eq!(
        theirs["tokens"].as_array().unwrap().len() + stop,
        ours["new_tokens"]
    );
    assert_eq!(
        theirs["prompt_tokens"].as_array().unwrap().len(),
        ours["prompt_tokens"]
    );
}

/// A Qwen2-style tokenizer folder in `dir`: SmolLM2's byte-level BPE vocabulary and merges with
/// Qwen2's pre-tokenizer (its split pattern, then bytes mapped without a regex) and NFC, and a
/// tokenizer_config.json as Qwen2's (no BOS, `<|endoftext|>` ends and pads).
fn qwen2_tokenizer(dir: &Path) {
    let text = std::fs::read_to_string(root().join(SMOLLM2_TOKENIZER)).unwrap();
    let mut json: Value = serde_json::from_str(&text).unwrap();
    json["normalizer"] = json!({"type": "NFC"});
    json["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": graft_model::formats::gguf_export::QWEN2_PATTERN},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
    ]});
    json["post_processor"] = Value::Null;
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    let config = json!({"add_bos_token": false, "bos_token": null,
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// A tiny Qwen2 (random f16-exact weights, biases on q, k and v, rope theta 1e6, untied head)
/// with a Qwen2-style tokenizer, exported alone, with a LoRA merged and the LoRA unmerged
/// (`--gguf-lora`): llama.cpp generates the greedy tokens graft generates from the same prompt,
/// and the adapter changes them.
#[test]
fn tiny_qwen2_with_and_without_lora_runs_in_llama_cpp_as_in_graft() {
    let dir = tempfile::tempdir().unwrap();
    let shape = dir.path().join("qwen2-tiny.json");
    let config = json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": false});
    std::fs::write(&shape, config.to_string()).unwrap();
    let model = dir.path().join("qwen2");
    let model_arg = model.to_str().unwrap();
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_graft"))
        .args([
            "random-model",
            "--shape",
            shape.to_str().unwrap(),
            "--seed",
            "3",
            "--dtype",
            "f16",
            "--out",
            model_arg,
        ])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    qwen2_tokenizer(&model);
    let adapter = train_lm(
        dir.path(),
        &format!(
            "[model]\npath = \"{model_arg}\"\ntemplate = \"plain\"\nmax_len = 64\n\
             [data]\ntrain = \"data/knowledge.jsonl\"\n\
             [train]\nseed = 1\nmax_steps = 5\nbatch_size = 1\nlr = 5e-2\n\
             [method]\nname = \"lora\"\nr = 4\nlora_alpha = 8\n\
             target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n"
        ),
    );
    let base_gguf = dir.path().join("qwen2.gguf");
    let lora_gguf = dir.path().join("qwen2-lora.gguf");
    export(&["--model", model_arg], "f16", &base_gguf);
    export(&["--adapter", &adapter], "f16", &lora_gguf);
    let unmerged = dir.path().join("qwen2-adapter.gguf");
    let (ok, said) = export_lora(&adapter, &unmerged);
    assert!(ok, "{said}");

    let prompt = "The Quillfeather X9 is sold in";
    let ours = [
        graft_generate(&["--model", model_arg], prompt, dir.path()),
        graft_generate(&["--adapter", &adapter], prompt, dir.path()),
    ];
    let job = |model: &Path, lora: Option<&Path>| json!({"model": model, "lora": lora, "prompt": prompt, "tokens": TOKENS});
    let theirs = llama_cpp(&json!([
        job(&base_gguf, None),
        job(&lora_gguf, None),
        job(&base_gguf, Some(&unmerged))
    ]));
    eprintln!("graft: {ours:?}\nllama.cpp: {theirs:?}");
    assert_ne!(
        ours[0]["text"], ours[1]["text"],
        "the adapter changes nothing"
    );
    assert_eq!(
        theirs[2]["text"], ours[1]["text"],
        "llama.cpp with the base and the --gguf-lora adapter against graft"
    );
    for (ours, theirs) in ours.iter().zip(&theirs) {
        assert_eq!(theirs["text"], ours["text"], "llama.cpp against graft");
        assert_same_token_counts(ours, theirs);
        assert_eq!(
            (
                &theirs["architecture"],
                &theirs["tokenizer_model"],
                &theirs["tokenizer_pre"]
            ),
            (&json!("qwen2"), &json!("gpt2"), &json!("qwen2"))
        );
    }
}

/// A ChatGLM SentencePiece model in `dir` (`tokenizer.model`, with a tokenizer_config.json
/// naming THUDM's tokenizer): BPE trained by SentencePiece with ChatGLM's settings on abstracts,
/// `pieces` pieces, so that with THUDM's nine special tokens it fills the embedding table.
fn chatglm_tokenizer(dir: &Path, pieces: usize) -> PathBuf {
    let script = "import csv, sys, sentencepiece as spm\n\
        rows = [r['title'] + '\\n' + r['abstract'] for r in csv.DictReader(open(sys.argv[1], encoding='utf-8'))][:400]\n\
        spm.SentencePieceTrainer.train(sentence_iterator=iter(rows), model_prefix=sys.argv[2], \
        vocab_size=int(sys.argv[3]), model_type='bpe', byte_fallback=True, split_digits=True, \
        normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=True, \
        allow_whitespace_only_pieces=True, character_coverage=0.9995, num_threads=1, minloglevel=2)\n";
    let prefix = dir.join("tokenizer");
    let out = graft_testkit::python_with("spm-site", "sentencepiece", "sentencepiece==0.2.2")
        .args(["-c", script])
        .arg(root().join("../shared/data/abstracts/train.csv"))
        .arg(&prefix)
        .arg(pieces.to_string())
        .output()
        .expect("running python");
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "ChatGLMTokenizer"}"#,
    )
    .unwrap();
    dir.join("tokenizer.model")
}

/// The shared tiny ChatGLM2 (THUDM's layout: fused qkv with its bias, fused gate+up, rotary on
/// half of each head in interleaved pairs, two multi-query groups) with a ChatGLM SentencePiece
/// tokenizer: llama.cpp's `chatglm` generates from `[gMASK]sop` and a text the greedy tokens
/// graft generates.
#[test]
fn chatglm2_runs_in_llama_cpp_as_in_graft() {
    let dir = tempfile::tempdir().unwrap();
    let model = "../shared/fixtures/chatglm2_thudm";
    let tokenizer = chatglm_tokenizer(dir.path(), 512 - 9);
    let tokenizer_arg = tokenizer.to_str().unwrap();
    let gguf = dir.path().join("chatglm2.gguf");
    export(
        &["--model", model, "--tokenizer", tokenizer_arg],
        "f16",
        &gguf,
    );
    let text = "The clinical trial of the new treatment";
    let ours = graft_generate(
        &["--model", model, "--tokenizer", tokenizer_arg],
        text,
        dir.path(),
    );
    let prompt = format!("[gMASK]sop{text}");
    let theirs = &llama_cpp(&json!([{"model": gguf, "prompt": prompt, "tokens": TOKENS}]))[0];
    eprintln!("graft: {ours}\nllama.cpp: {theirs}");
    // llama.cpp's tokens decoded as graft decodes (a run of byte tokens that is no UTF-8 is
    // one U+FFFD per byte in graft, fewer in llama.cpp), against graft's text.
    let decoder = graft_tokenizer::TextTokenizer::from_file(
        &tokenizer,
        512,
        graft_tokenizer::Padding::Longest,
    )
    .unwrap();
    let ids: Vec<u32> = theirs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        decoder.decode(&ids).unwrap(),
        ours["text"].as_str().unwrap(),
        "llama.cpp against graft"
    );
    assert_same_token_counts(&ours, theirs);
    assert_eq!(
        (&theirs["architecture"], &theirs["tokenizer_model"]),
        (&json!("chatglm"), &json!("llama"))
    );
    assert!(theirs["chat_template"]
        .as_str()
        .unwrap()
        .starts_with("[gMASK]sop"));
}
