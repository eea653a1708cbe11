//! Checks every PEFT method must pass, for plugin test suites (in-tree and third-party):
//! gradients agree with finite differences, every trainable tensor gets a gradient, the loss
//! falls on real data, a saved adapter reloads to the same logits, and the method's
//! `Hooks::acts_on` promises hold.
//!
//! A crate of its own (a dev-dependency of the plugins) so that graft-trainer does not ship
//! test code. It needs the tokenizer, the data reader and the optimiser, hence graft-trainer.
mod classifier;
mod decoder;
mod error;
mod fixtures;
mod gradients;
mod properties;
mod suite;
mod tagging;
mod training;

pub use classifier::{
    check_acts_on, check_gradients, check_merge, check_peft_fixture, check_reload, check_trains,
    Reloaded,
};
pub use decoder::{
    check_accumulation, check_decoder_classifier, check_lm_checkpointing, check_lm_families,
    check_lm_half_precision, check_lm_method, check_lm_quantized, BF16_LOGITS_TOLERANCE,
};
pub use error::{Error, Result};
pub use fixtures::{
    attach_error, classifier, fixture_dir, keys, lm_config, lm_spec, loss, max_abs_diff,
    minilm_dir, python_with, randomize, randomize_vars, real_batch, real_data_path, registry_of,
    spec, stories260k_dir, story_pairs, workspace_root, Family,
};
pub use gradients::{finite_difference_check, GradientSample};
pub use properties::{check_merge_equals_forward, LowRankCase};
pub use suite::{Randomize, Suite};
pub use tagging::check_tags;
pub use training::train_steps;
