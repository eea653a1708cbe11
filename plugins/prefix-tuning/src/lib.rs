//! Prefix tuning (Li and Liang 2021) as Hugging Face PEFT defines it, as a graft plugin:
//! trainable key/value prefixes in every attention layer, optionally reparametrised through an
//! MLP that saving folds into PEFT's `prompt_embeddings` table.
//!
//! Its config and math are graft-peft's, shared with P-tuning v2
//! ([`graft_peft::prompt_learning::PrefixConfig`], [`graft_peft::prompt_learning::PrefixAdapter`]);
//! this crate holds what is its own: the name, no prefix dropout (PEFT has none), and the
//! model fields PEFT's configs carry passing.
use graft_peft::prompt_learning::{PrefixMethod, PrefixPlugin, VirtualTokens};

graft_peft::plugin!(
    PrefixTuning,
    "prefix-tuning",
    "PREFIX_TUNING",
    prompt_learning
);

impl PrefixPlugin for PrefixTuning {
    const METHOD: PrefixMethod =
        PrefixMethod::without_dropout("prefix-tuning", VirtualTokens::MODEL_FIELDS);
    /// configs/prefix-tuning.toml, the recipe `cargo xtask train --method prefix-tuning` documents.
    const RECOMMENDED_CONFIG: Option<&'static str> =
        Some(include_str!("../../../configs/prefix-tuning.toml"));
}
