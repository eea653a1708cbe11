//! IA3 through the whole BERT with the shared method checks, and merging (bias included).
use graft_peft::serde_json::{self, json};
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({})
}

#[test]
fn finite_differences_agree_with_autograd_for_every_ia3_vector() {
    let method = graft_plugin_ia3::method();
    // Ones make every site the identity; random vectors test the general case.
    let samples = testkit::check_gradients(method.as_ref(), &settings(), 2, |c| {
        testkit::randomize(c, |k| k.ends_with("ia3_l"), 0.5, 3)
    })
    .unwrap();
    // key, value, attention.output.dense and output.dense in each of 6 layers.
    assert_eq!(samples.len(), 6 * 4 * 2);
}

#[test]
fn trains_on_a_real_batch_and_every_vector_gets_a_gradient() {
    let method = graft_plugin_ia3::method();
    testkit::check_trains(method.as_ref(), &settings(), 6, 2e-2).unwrap();
}

#[test]
fn saved_adapter_reloads_to_identical_logits_and_merges_to_the_same_logits() {
    let method = graft_plugin_ia3::method();
    let mut reloaded =
        testkit::check_reload(method.as_ref(), &settings(), graft_plugin_ia3::method()).unwrap();
    testkit::check_merge(&mut reloaded, 1e-5).unwrap();
}

#[test]
fn feedforward_modules_must_be_targets() {
    let method = graft_plugin_ia3::method();
    let config = json!({ "target_modules": ["key"], "feedforward_modules": ["output.dense"] });
    let err = testkit::classifier(
        method.as_ref(),
        &config,
        graft_peft::candle::DType::F32,
        16,
        1,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("subset"), "{err}");
}

/// On both decoder families: gradients, training and reload (see `testkit::check_lm_method`).
#[test]
fn trains_and_reloads_on_llama_and_chatglm() {
    testkit::check_lm_families(graft_plugin_ia3::method, &settings(), (8, 5e-2), |lm| {
        testkit::randomize_vars(&lm.trainable(), |k| k.ends_with("ia3_l"), 0.5, 3)
    })
    .unwrap();
}
