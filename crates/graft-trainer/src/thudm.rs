//! THUDM's P-tuning v2 output for ChatGLM (`ptuning/main.py`'s checkpoint folder: the model's
//! config.json with `pre_seq_len`, and `pytorch_model.bin` holding only the prefix table
//! `transformer.prefix_encoder.embedding.weight`) read as a graft P-tuning v2 adapter. The
//! method itself reads THUDM's key and `pre_seq_len` (`graft_peft::prompt_learning`); this
//! finds the files, which name no base model, and checks them against the base given.
use crate::{Error, Result};
use candle_core::Device;
use graft_peft::adapter::{SavedAdapter, CONFIG_FILE as ADAPTER_CONFIG};
use graft_peft::prompt_learning::THUDM_PREFIX;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// graft's method for THUDM's prefix.
pub const METHOD: &str = "p-tuning-v2";
const WEIGHTS: &str = "pytorch_model.bin";

/// The config fields the prefix table's shape depends on (`[pre_seq_len, num_layers x 2 x
/// multi_query_group_num x kv_channels]`), and the width of the model it was trained in.
const SHAPE_FIELDS: [&str; 4] = [
    "num_layers",
    "multi_query_group_num",
    "kv_channels",
    "hidden_size",
];

/// Whether `dir` is such a folder: no adapter_config.json, a pytorch_model.bin, and a
/// config.json that sets `pre_seq_len`.
pub fn is_checkpoint(dir: &Path) -> bool {
    !dir.join(ADAPTER_CONFIG).exists()
        && dir.join(WEIGHTS).is_file()
        && read_json(&dir.join("config.json"))
            .is_ok_and(|c| c.get("pre_seq_len").is_some_and(|n| !n.is_null()))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Adapter {
        path: path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })
}

/// The base model of such a folder, `base` (which the folder does not record), checked to fit
/// it; with the base's longest sequence.
pub fn base(dir: &Path, base: Option<&Path>) -> Result<(PathBuf, usize)> {
    let base = base.ok_or_else(|| Error::Adapter {
        path: dir.to_path_buf(),
        reason: "THUDM's P-tuning v2 output does not name its base model: give the ChatGLM \
                 folder it was trained on (--model)"
            .into(),
    })?;
    let max_positions = check_base(dir, base)?;
    Ok((base.to_path_buf(), max_positions))
}

/// The base must be a ChatGLM of the shape the prefix was trained on: the table's width alone
/// cannot tell layers from groups. Returns the base's longest sequence.
fn check_base(dir: &Path, base: &Path) -> Result<usize> {
    let ours_path = dir.join("config.json");
    let ours = read_json(&ours_path)?;
    let (plan, theirs) = graft_model::load::read_plan(base)?;
    let base_config = if base.is_dir() {
        base.join("config.json")
    } else {
        base.to_path_buf()
    };
    let mismatch = |reason: String| Error::Adapter {
        path: ours_path.clone(),
        reason,
    };
    let model_type = theirs["model_type"].as_str().unwrap_or("unknown");
    if model_type != "chatglm" {
        return Err(mismatch(format!(
            "a ChatGLM P-tuning v2 prefix, but the base {} is model_type `{model_type}`",
            base.display()
        )));
    }
    for field in SHAPE_FIELDS {
        if ours[field] != theirs[field] {
            return Err(mismatch(format!(
                "`{field}` is {} here but {} in the base {}: the prefix was trained on another \
                 model",
                ours[field],
                theirs[field],
                base_config.display()
            )));
        }
    }
    Ok(plan.spec.max_positions)
}

/// The prefix table and `pre_seq_len`, as a saved adapter the P-tuning v2 method loads.
pub fn read(dir: &Path, device: &Device) -> Result<SavedAdapter> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let refuse = |reason: String| Error::Adapter {
        path: config_path.clone(),
        reason,
    };
    let n = config["pre_seq_len"]
        .as_u64()
        .ok_or_else(|| refuse(format!("`pre_seq_len` is {}", config["pre_seq_len"])))?;
    if config["prefix_projection"].as_bool() == Some(true) {
        return Err(refuse(
            "`prefix_projection` is true: graft reads THUDM's prefix table, not the MLP \
             (`transformer.prefix_encoder.trans.*`) such a run trains over it"
                .into(),
        ));
    }
    let weights: PathBuf = dir.join(WEIGHTS);
    let tensors = graft_model::formats::pytorch::read_all(&weights)?;
    if !tensors.contains_key(THUDM_PREFIX) {
        let mut keys: Vec<&str> = tensors.keys().map(String::as_str).collect();
        keys.sort_unstable();
        return Err(Error::Adapter {
            path: weights,
            reason: format!(
                "no `{THUDM_PREFIX}` (holds {}): not THUDM's P-tuning v2 output",
                keys.join(", ")
            ),
        });
    }
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect::<Result<_>>()?;
    Ok(SavedAdapter {
        dir: dir.to_path_buf(),
        config: serde_json::json!({ "pre_seq_len": n }),
        tensors,
    })
}
