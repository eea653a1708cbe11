//! Full fine-tuning through the whole BERT with the shared method checks; the saved folder is
//! a complete model that candle-transformers' BERT reads.
use graft_peft::candle::DType;
use graft_peft::serde_json::{self, json};
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({})
}

#[test]
fn finite_differences_agree_with_autograd_for_every_base_tensor() {
    let method = graft_plugin_full::method();
    let samples = testkit::check_gradients(method.as_ref(), &settings(), 1, |_| Ok(())).unwrap();
    // MiniLM: 3 embedding tables + 2 norms, 6 layers x 16, pooler 2.
    assert_eq!(samples.len(), 5 + 6 * 16 + 2);
}

#[test]
fn trains_on_a_real_batch_and_every_tensor_gets_a_gradient() {
    let method = graft_plugin_full::method();
    testkit::check_trains(method.as_ref(), &settings(), 5, 1e-4).unwrap();
}

#[test]
fn saves_a_complete_model_that_reloads_to_identical_logits() {
    let method = graft_plugin_full::method();
    let reloaded =
        testkit::check_reload(method.as_ref(), &settings(), graft_plugin_full::method()).unwrap();
    // The reopened model is the saved folder itself, with its trained head and no adapter.
    assert!(reloaded.classifier.adapter.trainable().is_empty());
    let err = testkit::classifier(method.as_ref(), &json!({"r": 8}), DType::F32, 16, 1)
        .err()
        .unwrap();
    assert!(err.to_string().contains("unknown keys"), "{err}");
}

/// On both decoder families: gradients, training and reload (see `testkit::check_lm_method`).
#[test]
fn trains_and_reloads_on_llama_and_chatglm() {
    testkit::check_lm_families(
        graft_plugin_full::method,
        &settings(),
        (5, 1e-3),
        |_| Ok(()),
    )
    .unwrap();
}

/// Full fine-tuning of a decoder classifier saves a model folder with its `score` head.
#[test]
fn classifies_on_a_decoder() {
    testkit::check_decoder_classifier(
        graft_plugin_full::method().as_ref(),
        &settings(),
        (5, 1e-3),
        graft_plugin_full::method(),
    )
    .unwrap();
}
