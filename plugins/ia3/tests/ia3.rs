//! IA3 through the whole BERT with the shared method checks, and merging (bias included).
use graft_peft::serde_json::{self, json};
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({})
}

/// Ones make every site the identity; the gradient checks draw random vectors, the general
/// case. Key, value, attention.output.dense and output.dense in each of 6 layers: 24 vectors.
fn suite() -> testkit::Suite {
    testkit::Suite::new(graft_plugin_ia3::method, settings(), (2, 6 * 4), (6, 2e-2))
        .randomizing(|k| k.ends_with("ia3_l"), 0.5)
        .merging(1e-5)
        .on_decoders(settings(), (8, 5e-2))
}

graft_testkit::method_tests!(
    standard,
    suite(),
    [gradients, trains, tags, reloads, decoders]
);

#[test]
fn feedforward_modules_must_be_targets() {
    let config = json!({ "target_modules": ["key"], "feedforward_modules": ["output.dense"] });
    let err = testkit::attach_error(graft_plugin_ia3::method().as_ref(), &config);
    assert!(err.contains("subset"), "{err}");
}
