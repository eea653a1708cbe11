//! A Hugging Face model folder's weights in whichever layout it has: `model.safetensors`,
//! safetensors shards with `model.safetensors.index.json`, `pytorch_model.bin`, or
//! `pytorch_model-*.bin` shards with `pytorch_model.bin.index.json` (THUDM's ChatGLM2-6B).
//! Safetensors come first where a folder has both, as in transformers.
use super::{pytorch, safetensors};
use crate::error::{Error, Result};
use crate::weights::{Loading, Quantizing, Weights};
use candle_core::{DType, Device};
use std::path::{Component, Path};

/// A reader of one file into a [`Loading`].
type Reader = fn(&Path, &mut Loading) -> Result<()>;

/// Each layout: the index of shards, the single file, and their format's reader.
const LAYOUTS: [(&str, &str, Reader); 2] = [
    (
        "model.safetensors.index.json",
        "model.safetensors",
        safetensors::read_file,
    ),
    (
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
        pytorch::read_file,
    ),
];

impl Weights {
    /// The weights of a model folder; the tensors `quantizing` names are quantized as they are
    /// read, so the model is never held whole unquantized.
    pub fn load_folder(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quantizing: Option<&Quantizing>,
    ) -> Result<Self> {
        let mut loading = Loading::new(dtype, device, quantizing);
        for (index, single, read) in LAYOUTS {
            let (index, single) = (dir.join(index), dir.join(single));
            if index.is_file() {
                for shard in shards(&index)? {
                    read(&dir.join(shard), &mut loading)?;
                }
                return loading.finish(&index);
            }
            if single.is_file() {
                read(&single, &mut loading)?;
                return loading.finish(&single);
            }
        }
        Err(Error::MissingFile {
            path: dir.join(LAYOUTS[0].1),
            what: "model weights",
        })
    }
}

/// The shard files an index's `weight_map` names, each once, sorted: bare file names in the
/// index's folder, as transformers writes them, so that an index cannot point the reader at
/// `../../secret.bin` or `/dev/zero`. (A shard that is a symlink is left alone: a Hugging
/// Face cache's snapshot folder is made of them.)
fn shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::Config {
            path: index.to_path_buf(),
            source,
        })?;
    let map = parsed
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Weights {
            path: index.to_path_buf(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort_unstable();
    shards.dedup();
    for shard in &shards {
        let mut parts = Path::new(shard).components();
        let bare = matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        );
        if !bare || shard.contains('\\') {
            return Err(Error::CheckpointRefused {
                path: index.to_path_buf(),
                what: format!(
                    "`weight_map` names the shard `{shard}`, which is not a file name in the \
                     index's folder"
                ),
            });
        }
    }
    Ok(shards)
}
