//! The four kinds of site where a PEFT method may act on a model, and nowhere else.
//!
//! A model calls [`Hooks`] while it runs; a method implements it. The model owns every layout
//! detail (where prompts go, how prefixes widen the mask, position ids); a method only supplies
//! tensors of the documented shapes.
use candle_core::{Result, Tensor};

/// A projection inside the model, as a method sees it while the model runs.
pub struct LinearSite<'a> {
    /// Dotted name matching the Hugging Face module path, e.g.
    /// `bert.encoder.layer.0.attention.self.query`.
    pub name: &'a str,
    pub out_features: usize,
    pub in_features: usize,
    /// Frozen weight, `[out_features, in_features]` (torch's nn.Linear layout); `None` where
    /// the base keeps it quantized (`[model] quantize`).
    pub weight: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
}

/// Which of a method's linear-site hooks act on a site (see [`Hooks::acts_on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acts {
    /// None: the site computes what the base model's does.
    Not,
    /// Only [`Hooks::low_rank`]: no input replacement, no output hook.
    LowRankOnly,
    /// Any of them.
    Any,
}

/// A low-rank update of a linear site's output: `(x ⊙ input_mask) · aᵀ · bᵀ`.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `[rank, in_features]`.
    pub a: Tensor,
    /// `[out_features, rank]`, any scale folded in.
    pub b: Tensor,
    /// Dropout's keep mask over the input (the shape of `x`, already divided by the keep
    /// probability), if the update sees a dropped-out input.
    pub input_mask: Option<Tensor>,
}

/// Static description of a linear site: what a method needs to create its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteInfo {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    /// Transformer block index, `None` for sites outside the blocks (pooler, head).
    pub layer: Option<usize>,
}

/// Shape facts of a model that prompt and prefix methods size their tensors by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Architecture name as in config.json's `model_type`, e.g. `bert`.
    pub model_type: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Checkpoint key of the input word-embedding table `[vocab, hidden]`.
    pub word_embeddings: String,
}

/// Injection points. Every method has a default that leaves the model unchanged.
pub trait Hooks {
    /// Called at every linear site before its frozen projection: a replacement for the input
    /// the projection reads (same shape and dtype as `x`), or `None` to keep `x`. Methods that
    /// rescale inputs (IA3's feed-forward sites) act here, so the projection runs once.
    fn linear_input(&self, _site: &LinearSite<'_>, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Which of this method's linear-site hooks may act on the site named `site`. A promise
    /// that lets the model fuse the site with its neighbours: at a site it is [`Acts::Not`]
    /// for, the hooks are not called; where it is [`Acts::LowRankOnly`], only
    /// [`Hooks::low_rank`] is. The default, [`Acts::Any`], is always correct.
    fn acts_on(&self, _site: &str) -> Acts {
        Acts::Any
    }

    /// Called at every linear site with its input `x`: a low-rank update `(x ⊙ mask) · aᵀ ·
    /// bᵀ` to add to the frozen projection's output (LoRA, AdaLoRA), or `None`. The model adds
    /// it inside the projection (one graph node, the update accumulated by the product itself),
    /// which a [`Hooks::linear`] that adds the same sum would not get.
    fn low_rank(&self, _site: &LinearSite<'_>, _x: &Tensor) -> Result<Option<LowRank>> {
        Ok(None)
    }

    /// Called at every linear site with the site's input `x` (`[.., in]`, as it was before any
    /// [`Hooks::linear_input`] replacement) and the frozen projection's output `base`
    /// (`[.., out]`); returns the site's output.
    fn linear(&self, _site: &LinearSite<'_>, _x: &Tensor, base: Tensor) -> Result<Tensor> {
        Ok(base)
    }

    /// Virtual token embeddings `[batch, n, hidden]` placed ahead of the embedded input.
    fn prompt(&self, _batch: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Number of key/value prefix positions that [`Hooks::kv_prefix`] supplies to every layer.
    fn kv_prefix_len(&self) -> usize {
        0
    }

    /// Key and value prefixes of one layer, each `[batch, kv_prefix_len, kv_heads, head_dim]`.
    fn kv_prefix(&self, _layer: usize, _batch: usize) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// A tensor to use in place of the frozen base tensor `key` (its checkpoint key, e.g.
    /// `bert.encoder.layer.0.output.LayerNorm.weight`), with the same shape and dtype; a
    /// trainable one makes the base weight trainable (full fine-tuning).
    fn parameter(&self, _key: &str) -> Option<Tensor> {
        None
    }
}

/// The base model alone.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn acts_on(&self, _site: &str) -> Acts {
        Acts::Not
    }
}
