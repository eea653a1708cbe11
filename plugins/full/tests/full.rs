//! Full fine-tuning through the whole BERT with the shared method checks; the saved folder is
//! a complete model that candle-transformers' BERT reads.
use graft_peft::serde_json::{self, json};
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({})
}

/// MiniLM's tensors: 3 embedding tables + 2 norms, 6 layers x 16, pooler 2. A decoder
/// classifier saves a model folder with its `score` head.
fn suite() -> testkit::Suite {
    let tensors = 5 + 6 * 16 + 2;
    testkit::Suite::new(
        graft_plugin_full::method,
        settings(),
        (1, tensors),
        (5, 1e-4),
    )
    .on_decoders(settings(), (5, 1e-3))
}

graft_testkit::method_tests!(
    standard,
    suite(),
    [gradients, trains, tags, decoders, decoder_classifier]
);

#[test]
fn saves_a_complete_model_that_reloads_to_identical_logits() {
    let reloaded = suite().check_reload().unwrap();
    // The reopened model is the saved folder itself, with its trained head and no adapter.
    assert!(reloaded.classifier.adapter.trainable().is_empty());
    let err = testkit::attach_error(graft_plugin_full::method().as_ref(), &json!({"r": 8}));
    assert!(err.contains("unknown keys"), "{err}");
}
