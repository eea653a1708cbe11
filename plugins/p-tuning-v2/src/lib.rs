//! P-tuning v2 (Liu et al. 2022) as a graft plugin: deep prompts, i.e. trainable key/value
//! prefixes at every layer, without reparametrisation by default, read by a classification
//! head on the pooled output (no verbalizer).
//!
//! On disk it is Hugging Face PEFT's prefix tuning (`peft_type` PREFIX_TUNING,
//! `prompt_embeddings`, `prefix_projection` false) plus the head, so PEFT loads it as such.
//! Config and math are graft-peft's, shared with prefix tuning; this crate holds the paper's
//! defaults: prefix dropout 0.1 while training (THUDM's P-tuning v2 uses the model's
//! hidden_dropout_prob, 0.1 for BERT models), 20 virtual tokens (short prompts suit sentence
//! classification; sequence labelling wants about 100), no reparametrisation (the paper finds
//! it task-dependent).
use graft_peft::prompt_learning::{PrefixMethod, PrefixPlugin};

graft_peft::plugin!(PTuningV2, "p-tuning-v2", "PREFIX_TUNING", prompt_learning);

impl PrefixPlugin for PTuningV2 {
    const METHOD: PrefixMethod = PrefixMethod::with_dropout("p-tuning-v2", 0.1);
    /// configs/p-tuning-v2.toml, the recipe `cargo xtask train --method p-tuning-v2` documents.
    const RECOMMENDED_CONFIG: Option<&'static str> =
        Some(include_str!("../../../configs/p-tuning-v2.toml"));
}
