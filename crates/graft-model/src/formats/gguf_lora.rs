//! Writing a low-rank adapter (LoRA, AdaLoRA) as llama.cpp's LoRA adapter GGUF, which it
//! loads beside a base GGUF (`--lora`) without merging: `general.type = adapter`, each
//! updated weight's factors as `<base tensor name>.lora_a` `[r, in]` and `.lora_b` `[out, r]`.
//!
//! The factors are the ones graft's forward pass adds ([`Hooks::low_rank`]), so every scale
//! is already in B: alpha/r, rsLoRA's alpha/sqrt(r), AdaLoRA's alpha/init_r and its singular
//! values (in A). llama.cpp multiplies each pair by `adapter.lora.alpha / r`, r read from the
//! pair's shape: pairs of unequal rank (AdaLoRA prunes per site) are padded with zeros to the
//! largest rank R and alpha is R, so that llama.cpp's factor is 1 at every site and the
//! user's `--lora-scaled` scale means what it says.
use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::formats::gguf;
use crate::formats::gguf_export::Arch;
use crate::formats::gguf_writer::{self, TensorInfo};
use crate::hooks::{Acts, Hooks, LinearSite, LowRank};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// What [`write_lora`] wrote: how many weights the adapter updates, the rank of its pairs,
/// and the file's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLora {
    pub pairs: usize,
    pub rank: usize,
    pub bytes: u64,
}

/// Writes the low-rank updates that `hooks` (an adapter of the method named `method`) add to
/// `decoder`'s projections to `path`, as a llama.cpp LoRA adapter for the base `decoder`
/// exported by `graft export --gguf` (a Llama, Qwen2 or ChatGLM2/3). Refuses a method whose hooks
/// do anything else (prompts, prefixes, rescaled inputs, replaced weights): llama.cpp's
/// adapters hold only low-rank pairs, and such a method is exported merged.
pub fn write_lora(
    decoder: &Decoder,
    hooks: &dyn Hooks,
    method: &str,
    name: &str,
    path: &Path,
) -> Result<WrittenLora> {
    let bad = |reason: String| Error::Export {
        path: path.to_path_buf(),
        reason,
    };
    let spec = decoder.spec();
    let arch = Arch::for_spec(spec).map_err(bad)?;
    if let Some(what) = not_low_rank(decoder, hooks)? {
        return Err(bad(format!(
            "method `{method}` {what}; a llama.cpp adapter holds only low-rank updates of the \
             weights (LoRA, AdaLoRA). Export the model with the adapter merged: --gguf TYPE"
        )));
    }
    let mut pairs = Vec::new();
    for site in decoder.sites() {
        if hooks.acts_on(&site.name) == Acts::Not {
            continue;
        }
        let key = format!("{}.weight", site.name);
        let Some(update) = low_rank(hooks, &site)? else {
            // Every rank pruned (AdaLoRA): the site is left as the base has it.
            continue;
        };
        let gguf_name = arch.tensor_name(&key).ok_or_else(|| {
            bad(format!(
                "`{key}` has no counterpart in llama.cpp's `{}`",
                arch.name()
            ))
        })?;
        let a = update.a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let b = update.b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        // B's rows are the update's rows: permuted as the base's are (Llama's Q and K).
        let b = match arch.permuted_heads(&key, spec) {
            Some(heads) => gguf::permute(&b, heads)?,
            None => b,
        };
        pairs.push((gguf_name, a, b));
    }
    let rank = pairs
        .iter()
        .map(|(_, a, _)| a.dims()[0])
        .max()
        .ok_or_else(|| {
            bad(format!(
                "method `{method}` updates no weight of this model: nothing to export"
            ))
        })?;
    let mut tensors = Vec::with_capacity(2 * pairs.len());
    for (gguf_name, a, b) in &pairs {
        let (a, b) = pad_rank(a, b, rank)?;
        tensors.push((format!("{gguf_name}.lora_a"), a));
        tensors.push((format!("{gguf_name}.lora_b"), b));
    }
    let infos: Vec<TensorInfo> = tensors
        .iter()
        .map(|(name, t)| TensorInfo {
            name: name.clone(),
            dims: t.dims().to_vec(),
            format: GgmlDType::F32,
        })
        .collect();
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.name().into()),
        ),
        ("general.type".into(), Value::String("adapter".into())),
        ("general.name".into(), Value::String(name.into())),
        // llama.cpp's ALL_F32.
        ("general.file_type".into(), Value::U32(0)),
        ("adapter.type".into(), Value::String("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(rank as f32)),
    ];
    let bytes = gguf_writer::write(path, &metadata, &infos, |i| {
        Ok(QTensor::quantize(&tensors[i].1, GgmlDType::F32)?)
    })?;
    Ok(WrittenLora {
        pairs: pairs.len(),
        rank,
        bytes,
    })
}

/// What `hooks` do besides low-rank updates of projections, if anything.
fn not_low_rank(decoder: &Decoder, hooks: &dyn Hooks) -> Result<Option<&'static str>> {
    if hooks.prompt(1)?.is_some() {
        return Ok(Some("prepends virtual tokens"));
    }
    if hooks.kv_prefix_len() > 0 {
        return Ok(Some("prepends key/value prefixes"));
    }
    if decoder
        .params()
        .iter()
        .any(|p| hooks.parameter(p.key()).is_some())
    {
        return Ok(Some("replaces base weights"));
    }
    if decoder
        .sites()
        .iter()
        .any(|s| hooks.acts_on(&s.name) == Acts::Any)
    {
        return Ok(Some("acts on projections other than by a low-rank update"));
    }
    Ok(None)
}

/// The update the hooks add at `site`, as inference sees it (no dropout).
fn low_rank(hooks: &dyn Hooks, site: &crate::hooks::SiteInfo) -> Result<Option<LowRank>> {
    let linear = LinearSite {
        name: &site.name,
        out_features: site.out_features,
        in_features: site.in_features,
        weight: None,
        bias: None,
    };
    // The input only tells the hooks the dtype (and the shape of a dropout mask, which
    // inference draws none of).
    let x = Tensor::zeros((1, site.in_features), DType::F32, &Device::Cpu)?;
    let update = hooks.low_rank(&linear, &x)?;
    if update.as_ref().is_some_and(|u| u.input_mask.is_some()) {
        return Err(Error::InvalidConfig(format!(
            "the adapter drew a dropout mask at `{}`: export it out of training mode",
            site.name
        )));
    }
    Ok(update)
}

/// `a` `[r, in]` and `b` `[out, r]` widened to rank `rank` with zero rows of A and zero
/// columns of B, which leave `b·a` as it is.
fn pad_rank(a: &Tensor, b: &Tensor, rank: usize) -> Result<(Tensor, Tensor)> {
    let r = a.dim(0)?;
    if r == rank {
        return Ok((a.clone(), b.clone()));
    }
    let (out, inp) = (b.dim(0)?, a.dim(1)?);
    let a = Tensor::cat(
        &[a, &Tensor::zeros((rank - r, inp), a.dtype(), a.device())?],
        0,
    )?;
    let b = Tensor::cat(
        &[b, &Tensor::zeros((out, rank - r), b.dtype(), b.device())?],
        1,
    )?;
    Ok((a, b))
}
