//! `graft export --gguf`: a decoder, with an adapter merged or alone, as a GGUF file for
//! llama.cpp and Ollama; `graft export --gguf-lora`: a LoRA or AdaLoRA adapter alone, as
//! llama.cpp's adapter GGUF, to load beside the base's GGUF.
use crate::models::{registry, resolve_model_file, PluginArgs};
use anyhow::{bail, Context, Result};
use graft_model::formats::gguf_export::{write_gguf, GgufType, TokenizerMetadata};
use graft_model::formats::gguf_lora::write_lora;
use graft_trainer::config::Precision;
use graft_trainer::lm::{CausalLm, LmSpec, OpenOptions};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// f16, q8_0 or q4_k: the type of the matrices (norms stay f32). q4_k gives a matrix whose
    /// rows are not a multiple of 256 wide q5_0, as llama.cpp's quantizer does.
    #[arg(long, required_unless_present = "gguf_lora", requires = "out")]
    gguf: Option<GgufType>,
    /// Write the adapter (LoRA or AdaLoRA) unmerged to this file, as llama.cpp's LoRA adapter
    /// GGUF for the base exported with --gguf (or converted by llama.cpp): `llama-cli -m
    /// BASE.gguf --lora THIS.gguf`.
    #[arg(long, value_name = "OUT.gguf", requires = "adapter", conflicts_with_all = ["gguf", "out"])]
    gguf_lora: Option<PathBuf>,
    /// A Hugging Face folder or a .gguf file (with --adapter: instead of the adapter's base).
    #[arg(long, required_unless_present = "adapter")]
    model: Option<PathBuf>,
    /// An adapter folder written by `graft train-lm`, merged into the weights (a mergeable
    /// method such as LoRA or IA3, or full fine-tuning's model); with --gguf-lora, written
    /// alone.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The GGUF file to write (with --gguf).
    #[arg(long)]
    out: Option<PathBuf>,
    /// --model is a config.json to build the model from with random weights of this seed, in
    /// bf16 (to measure an export at a real model's size).
    #[arg(long, requires = "model", conflicts_with = "adapter")]
    random_init: Option<u64>,
    /// tokenizer.json or a SentencePiece tokenizer.model (default: the model's, or the one the
    /// adapter's task names; with --gguf).
    #[arg(long, conflicts_with = "gguf_lora")]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    plugins: PluginArgs,
}

pub fn export(args: ExportArgs) -> Result<()> {
    let (out, flag) = match (&args.gguf_lora, &args.out) {
        (Some(out), _) => (out, "--gguf-lora"),
        (None, Some(out)) => (out, "--out"),
        (None, None) => bail!("--out is required"),
    };
    if out.exists() {
        bail!("{} exists; choose another {flag}", out.display());
    }
    let device = candle_core::Device::Cpu;
    let model = match args.random_init {
        Some(_) => args.model.clone(),
        None => args.model.as_deref().map(resolve_model_file).transpose()?,
    };
    let name = out
        .file_stem()
        .map_or("graft".into(), |s| s.to_string_lossy().into_owned());
    let open = |adapter: &Path| {
        let options = OpenOptions {
            model: model.clone(),
            dtype: Some(Precision::F32),
            dense: true,
            ..OpenOptions::default()
        };
        CausalLm::open_with(adapter, &registry(&args.plugins)?, &device, &options)
            .with_context(|| format!("loading the adapter in {}", adapter.display()))
    };
    let Some(ty) = args.gguf else {
        let adapter = args
            .adapter
            .as_deref()
            .context("--gguf-lora needs --adapter")?;
        let lm = open(adapter)?;
        let written = write_lora(&lm.model, lm.hooks(), &lm.spec.method, &name, out)
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!(
            "wrote {} ({:.1} KiB; {} weights updated by f32 pairs of rank {}): load it beside \
             the base's GGUF with llama.cpp's --lora",
            out.display(),
            written.bytes as f64 / 1024.0,
            written.pairs,
            written.rank
        );
        return Ok(());
    };
    let written = if let Some(adapter) = &args.adapter {
        let mut lm = open(adapter)?;
        lm.set_merged(true)
            .with_context(|| format!("merging the adapter in {}", adapter.display()))?;
        let tokenizer_path = args.tokenizer.as_deref().unwrap_or(&lm.spec.tokenizer);
        let tokenizer = tokenizer_metadata(&lm.spec.model, Some(tokenizer_path))?;
        write_gguf(&lm.model, lm.hooks(), &tokenizer, &name, ty, out)
    } else {
        let model = model.context("--model or --adapter is required")?;
        let decoder = match args.random_init {
            Some(seed) => graft_model::decoder::Decoder::random(
                &model,
                candle_core::DType::BF16,
                None,
                &device,
                seed,
            ),
            None => graft_model::decoder::Decoder::open(&model, candle_core::DType::F32, &device),
        }
        .with_context(|| format!("loading the model {}", model.display()))?;
        let tokenizer = tokenizer_metadata(&model, args.tokenizer.as_deref())?;
        write_gguf(&decoder, &graft_model::NoHooks, &tokenizer, &name, ty, out)
    }
    .with_context(|| format!("writing {}", out.display()))?;
    let formats: Vec<String> = written
        .formats
        .iter()
        .map(|(f, n)| format!("{n} {f}"))
        .collect();
    eprintln!(
        "wrote {} ({:.1} MiB; tensors: {})",
        out.display(),
        written.bytes as f64 / (1u64 << 20) as f64,
        formats.join(", ")
    );
    Ok(())
}

/// A GGUF base's own tokenizer metadata, else that of the tokenizer.json or SentencePiece
/// tokenizer.model the task names (or the one beside the model).
fn tokenizer_metadata(model: &Path, tokenizer: Option<&Path>) -> Result<TokenizerMetadata> {
    if model.extension().is_some_and(|x| x == "gguf") {
        return TokenizerMetadata::from_gguf(model)
            .with_context(|| format!("reading the tokenizer of {}", model.display()));
    }
    let path = tokenizer.map_or_else(|| LmSpec::default_tokenizer(model), Path::to_path_buf);
    if path.extension().is_some_and(|x| x == "model") {
        return sentencepiece_metadata(&path)
            .with_context(|| format!("converting the tokenizer {}", path.display()));
    }
    TokenizerMetadata::from_folder(&path)
        .with_context(|| format!("converting the tokenizer {}", path.display()))
}

/// A SentencePiece model's vocabulary for llama.cpp; for ChatGLM's, THUDM's special tokens
/// (`[gMASK]`, `sop`, the role tokens) after it as control tokens, no BOS (the `[gMASK]sop`
/// prefix comes from ChatGLM3's chat format, which llama.cpp applies) and that format.
fn sentencepiece_metadata(path: &Path) -> Result<TokenizerMetadata> {
    use graft_model::formats::gguf_export::{
        SentencePieceToken, SentencePieceVocab, TokenKind, CHATGLM3_TEMPLATE,
    };
    use graft_tokenizer::{PieceType, SentencePieceFlavour, SentencePieceModel};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let model = SentencePieceModel::parse(path, &bytes)?;
    let flavour = SentencePieceFlavour::detect(path)?;
    let mut tokens: Vec<SentencePieceToken> = model
        .pieces
        .iter()
        .map(|p| SentencePieceToken {
            text: p.piece.clone(),
            score: p.score,
            kind: match p.kind {
                PieceType::Normal => TokenKind::Normal,
                PieceType::Unknown => TokenKind::Unknown,
                PieceType::Control => TokenKind::Control,
                PieceType::UserDefined => TokenKind::UserDefined,
                PieceType::Unused => TokenKind::Unused,
                PieceType::Byte => TokenKind::Byte,
            },
        })
        .collect();
    let id = |i: i32| u32::try_from(i).ok();
    let (add_bos, chat_template) = match flavour {
        SentencePieceFlavour::ChatGlm => {
            tokens.extend(graft_tokenizer::CHATGLM_SPECIAL_TOKENS.iter().map(|t| {
                SentencePieceToken {
                    text: t.to_string(),
                    score: 0.0,
                    kind: TokenKind::Control,
                }
            }));
            (false, Some(CHATGLM3_TEMPLATE.to_string()))
        }
        SentencePieceFlavour::Plain { add_bos, .. } => (add_bos, None),
    };
    Ok(TokenizerMetadata::from_sentencepiece(SentencePieceVocab {
        tokens,
        bos: id(model.bos_id),
        eos: id(model.eos_id),
        unk: id(model.unk_id),
        add_bos,
        add_space_prefix: model.add_dummy_prefix,
        chat_template,
    }))
}
