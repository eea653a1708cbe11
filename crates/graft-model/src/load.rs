//! Opening a model from disk: which format (safetensors folder, GGUF file) and which
//! architecture (`model_type`) a path holds, dispatched to the module that reads it.
use crate::decoder::{Decoder, Plan};
use crate::error::{Error, Result};
use crate::formats::gguf;
use crate::models::{chatglm, llama};
use crate::quant::Quantization;
use crate::weights::{Quantizing, Weights};
use candle_core::{DType, Device};
use std::path::Path;

impl Decoder {
    /// A decoder from a Hugging Face folder (config.json with `model_type` llama, mistral,
    /// qwen2 or chatglm; model.safetensors or sharded safetensors with their index) or from a
    /// Llama-family `.gguf` file, dequantised.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::open_quantized(path, dtype, None, device)
    }

    /// [`Decoder::open`], every projection weight kept quantized in `quantize`'s family
    /// (those whose rows no block divides stay in `dtype`); embeddings and norms in `dtype`.
    pub fn open_quantized(
        path: &Path,
        dtype: DType,
        quantize: Option<Quantization>,
        device: &Device,
    ) -> Result<Self> {
        let (plan, json) = read_plan(path)?;
        let quantizing = quantizing(&plan, quantize);
        if path.is_file() {
            let weights = gguf::load_llama(path, dtype, device, quantizing.as_ref())?;
            return Decoder::from_plan(&plan, &weights, json);
        }
        Decoder::from_plan(
            &plan,
            &Weights::load_folder(path, dtype, device, quantizing.as_ref())?,
            json,
        )
    }
}

impl Decoder {
    /// A decoder built from its config alone (`--random-init`): a config.json (or a model
    /// folder's) with THUDM's ChatGLM2/3 or Hugging Face's Llama/Qwen2 fields, its weights drawn
    /// from `seed` as [`crate::formats::random`] says, in `dtype` (the projections kept quantized
    /// in `quantize`'s family as they are made) on `device`.
    pub fn random(
        config: &Path,
        dtype: DType,
        quantize: Option<Quantization>,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        if config.extension().is_some_and(|x| x == "gguf") {
            return Err(Error::InvalidConfig(format!(
                "{}: a random model is built from a config.json, not a GGUF file",
                config.display()
            )));
        }
        let (plan, json) = read_plan(config)?;
        let quantizing = quantizing(&plan, quantize);
        let std = crate::formats::random::initializer_std(&json);
        let weights = crate::formats::random::weights(
            &plan,
            std,
            seed,
            dtype,
            device,
            quantizing.as_ref(),
            config,
        )?;
        Decoder::from_plan(&plan, &weights, json)
    }
}

/// Which weights a load in `quantize`'s family keeps quantized: every projection's.
fn quantizing(plan: &Plan, quantize: Option<Quantization>) -> Option<Quantizing> {
    quantize.map(|family| Quantizing {
        family,
        keys: plan
            .site_specs()
            .map(|s| format!("{}.weight", s.name))
            .collect(),
    })
}

/// The plan of a decoder from its config alone (no weights are read): a model folder, a
/// config.json, or a `.gguf` file's metadata. Also returns the config as JSON.
pub fn read_plan(path: &Path) -> Result<(Plan, serde_json::Value)> {
    if path.extension().is_some_and(|x| x == "gguf") {
        let (config, json) = gguf::read_llama_config(path)?;
        return Ok((llama::plan(&config)?, json));
    }
    let config_path = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&config_path)
        .map_err(Error::opening(&config_path, "model config"))?;
    let parse_error = |source| Error::Config {
        path: config_path.clone(),
        source,
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(parse_error)?;
    let in_file = |e: Error| match e {
        Error::InvalidConfig(reason) => {
            Error::InvalidConfig(format!("{}: {reason}", config_path.display()))
        }
        other => other,
    };
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if model_type != "chatglm" && !llama::MODEL_TYPES.contains(&model_type) {
        let known = format!("{}, chatglm", llama::MODEL_TYPES.join(", "));
        return Err(Error::InvalidConfig(if model_type == "bert" {
            format!(
                "{}: model_type `bert` is an encoder; this needs a decoder ({known})",
                config_path.display()
            )
        } else {
            format!(
                "{}: model_type `{model_type}` is not an architecture graft knows (bert, {known})",
                config_path.display()
            )
        }));
    }
    let plan = if model_type == "chatglm" {
        let config: chatglm::Config = serde_json::from_value(json.clone()).map_err(parse_error)?;
        chatglm::plan(&config).map_err(in_file)?
    } else {
        let config: llama::Config = serde_json::from_value(json.clone()).map_err(parse_error)?;
        llama::plan(&config).map_err(in_file)?
    };
    Ok((plan, json))
}
