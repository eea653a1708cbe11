//! `graft generate`, `graft logits` and `graft random-model`: running a decoder, with an adapter
//! or alone, and writing one with random weights.
use crate::lm::{chat_template, open_lm};
use crate::models::{resolve_model_file, PluginArgs};
use anyhow::{bail, Context, Result};
use graft_model::decoder::Decoder;
use graft_tokenizer::{ChatTemplate, TextTokenizer};
use graft_trainer::lm::{generate_text, LmSpec, OpenOptions};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A Hugging Face folder, a .gguf file, an alias or a hub id (owner/name[@revision])
    /// (with --adapter: the adapter's base model, by default the one it records; THUDM's
    /// P-tuning v2 output records none).
    #[arg(long, required_unless_present = "adapter")]
    model: Option<PathBuf>,
    /// An adapter folder written by `graft train-lm`, or by THUDM's `ptuning/main.py`.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// tokenizer.json (default: beside the model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// plain, chatglm2 or chatml (default: the adapter's, else plain).
    #[arg(long)]
    template: Option<String>,
    /// ChatML's system turn.
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Merge the adapter into the weights before generating (mergeable methods).
    #[arg(long)]
    merge: bool,
    /// JSON file to write the generation's token counts, time and peak RSS to.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// --model is a config.json to build the model from with random weights of this seed
    /// (as `train-lm --random-init` builds it with its train.seed), in f32.
    #[arg(long, requires = "model", conflicts_with = "adapter")]
    random_init: Option<u64>,
    #[command(flatten)]
    plugins: PluginArgs,
}

#[derive(clap::Args)]
pub struct LogitsArgs {
    #[arg(long, required_unless_present = "model")]
    adapter: Option<PathBuf>,
    /// The base model: with --adapter, in place of the one the adapter records (THUDM's
    /// P-tuning v2 output records none); alone, a model run without an adapter.
    #[arg(long)]
    model: Option<PathBuf>,
    /// tokenizer.json or tokenizer.model (default: the base's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// plain, chatglm2, chatglm3 or chatml (default: the adapter's; chatglm2 for THUDM's;
    /// plain for a base model alone).
    #[arg(long)]
    template: Option<String>,
    #[arg(long)]
    prompt: String,
    /// The base's dtype (default: the one it was trained in; f32 for --model).
    #[arg(long)]
    dtype: Option<graft_trainer::config::Precision>,
    /// JSON file to write: {"dtype", "device", "logits"}.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    plugins: PluginArgs,
}

#[derive(clap::Args)]
pub struct RandomModelArgs {
    /// The model's config.json (e.g. configs/shapes/llama-3.2-1b.json).
    #[arg(long)]
    shape: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value = "bf16")]
    dtype: graft_trainer::config::Precision,
    /// Folder to write.
    #[arg(long)]
    out: PathBuf,
}

/// A base model run without an adapter: its decoder (from `model`, or drawn from the shape
/// `model` with `random_init`'s seed), its tokenizer (`tokenizer`, else the model's) and the
/// template (`template`, else plain).
fn open_base(
    model: &Path,
    random_init: Option<u64>,
    tokenizer: Option<PathBuf>,
    template: Option<ChatTemplate>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<(Decoder, TextTokenizer, ChatTemplate)> {
    let model = match random_init {
        Some(_) => model.to_path_buf(),
        None => resolve_model_file(model)?,
    };
    let decoder = match random_init {
        Some(seed) => Decoder::random(&model, dtype, None, device, seed),
        None => Decoder::open(&model, dtype, device),
    }
    .with_context(|| format!("loading the model {}", model.display()))?;
    let tokenizer = TextTokenizer::from_file(
        &tokenizer.unwrap_or_else(|| LmSpec::default_tokenizer(&model)),
        decoder.spec().max_positions,
        graft_tokenizer::Padding::Longest,
    )?;
    let template = match template {
        Some(template) => template,
        None => chat_template("plain", None)?,
    };
    Ok((decoder, tokenizer, template))
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let sampling = graft_model::generate::Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut print = |text: &str| {
        use std::io::Write;
        print!("{text}");
        let _ = std::io::stdout().flush();
    };
    let device = graft_model::default_device()?;
    let template = (args.template)
        .map(|t| chat_template(&t, args.system.clone()))
        .transpose()?;
    let (answer, seconds) = if let Some(adapter) = &args.adapter {
        let options = OpenOptions {
            model: args.model,
            tokenizer: args.tokenizer,
            template,
            ..OpenOptions::default()
        };
        let mut lm = open_lm(adapter, &args.plugins, &device, &options)?;
        if args.merge {
            lm.set_merged(true)?;
        }
        let started = std::time::Instant::now();
        let answer = lm.generate(&args.prompt, args.max_new_tokens, &sampling, &mut print)?;
        (answer, started.elapsed().as_secs_f64())
    } else {
        let model = args.model.context("--model or --adapter is required")?;
        // Without --template: plain, with the system turn if one is given.
        let template = match template {
            Some(template) => template,
            None => chat_template("plain", args.system)?,
        };
        let (decoder, tokenizer, template) = open_base(
            &model,
            args.random_init,
            args.tokenizer,
            Some(template),
            candle_core::DType::F32,
            &device,
        )?;
        let started = std::time::Instant::now();
        let answer = generate_text(
            &decoder,
            &graft_model::NoHooks,
            &tokenizer,
            &template,
            &args.prompt,
            args.max_new_tokens,
            &sampling,
            &mut print,
        )?;
        (answer, started.elapsed().as_secs_f64())
    };
    println!();
    if let Some(path) = args.stats {
        let report = serde_json::json!({
            "prompt_tokens": answer.prompt_tokens,
            "new_tokens": answer.new_tokens,
            "stopped": answer.stopped,
            // Prompt and generation together, as a caller waits for them.
            "seconds": seconds,
            "new_tokens_per_s": answer.new_tokens as f64 / seconds.max(1e-9),
            "text": answer.text,
            "peak_rss_mb": graft_trainer::fit::peak_rss_mb(),
            "matmul": graft_model::ops::matmul_path(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub fn logits(args: LogitsArgs) -> Result<()> {
    let device = graft_model::default_device()?;
    let template = (args.template)
        .map(|name| chat_template(&name, None))
        .transpose()?;
    let (logits, dtype) = match &args.adapter {
        Some(adapter) => {
            let options = OpenOptions {
                model: args.model,
                tokenizer: args.tokenizer,
                template,
                dtype: args.dtype,
                ..OpenOptions::default()
            };
            let lm = open_lm(adapter, &args.plugins, &device, &options)?;
            (lm.next_token_logits(&args.prompt)?, lm.spec.dtype)
        }
        None => {
            let model = args.model.context("--adapter or --model is required")?;
            let dtype = args.dtype.unwrap_or_default();
            let (decoder, tokenizer, template) = open_base(
                &model,
                None,
                args.tokenizer,
                template,
                dtype.dtype(),
                &device,
            )?;
            let logits = graft_trainer::lm::next_token_logits(
                &decoder,
                &graft_model::NoHooks,
                &tokenizer,
                &template,
                &args.prompt,
            )?;
            (logits, dtype)
        }
    };
    let logits: Vec<f32> = logits.to_vec1()?;
    let report = serde_json::json!({
        "dtype": dtype.name(),
        "device": if device.is_cuda() { "cuda" } else { "cpu" },
        "logits": logits,
    });
    std::fs::write(&args.out, serde_json::to_string(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))
}

pub fn random_model(args: RandomModelArgs) -> Result<()> {
    let out = &args.out;
    if out.join("model.safetensors").exists() {
        bail!(
            "{} already holds a model; choose another --out",
            out.display()
        );
    }
    // Drawn and written on the CPU: the weights go to a file, never through a GPU.
    let decoder = Decoder::random(
        &args.shape,
        args.dtype.dtype(),
        None,
        &candle_core::Device::Cpu,
        args.seed,
    )
    .with_context(|| format!("building a random model from {}", args.shape.display()))?;
    decoder
        .save(out, &graft_model::NoHooks)
        .with_context(|| format!("writing the model to {}", out.display()))?;
    eprintln!(
        "random model (seed {}, {}) written to {}",
        args.seed,
        args.dtype,
        out.display()
    );
    Ok(())
}
