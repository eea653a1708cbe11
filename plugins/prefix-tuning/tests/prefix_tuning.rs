//! Prefix tuning through the whole BERT with the shared method checks, the PEFT fixture, and
//! the attention properties of key/value prefixes.
use graft_peft::serde_json::{self, json};
use graft_trainer::testkit;

fn settings() -> serde_json::Value {
    json!({ "num_virtual_tokens": 4 })
}

fn projected() -> serde_json::Value {
    json!({ "num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16 })
}

#[test]
fn finite_differences_agree_with_autograd_with_and_without_projection() {
    let method = graft_plugin_prefix_tuning::method();
    let samples = testkit::check_gradients(method.as_ref(), &settings(), 3, |_| Ok(())).unwrap();
    assert_eq!(samples.len(), 3);
    let samples = testkit::check_gradients(method.as_ref(), &projected(), 2, |_| Ok(())).unwrap();
    assert_eq!(
        samples.len(),
        5 * 2,
        "embedding and both projection layers sampled"
    );
}

#[test]
fn trains_on_a_real_batch_with_and_without_projection() {
    let method = graft_plugin_prefix_tuning::method();
    testkit::check_trains(method.as_ref(), &settings(), 6, 3e-2).unwrap();
    testkit::check_trains(method.as_ref(), &projected(), 6, 1e-2).unwrap();
}

#[test]
fn saved_adapter_reloads_to_identical_logits_and_the_projection_is_folded_in() {
    let method = graft_plugin_prefix_tuning::method();
    testkit::check_reload(
        method.as_ref(),
        &settings(),
        graft_plugin_prefix_tuning::method(),
    )
    .unwrap();
    let reloaded = testkit::check_reload(
        method.as_ref(),
        &projected(),
        graft_plugin_prefix_tuning::method(),
    )
    .unwrap();
    let keys: Vec<String> = reloaded
        .classifier
        .adapter
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["prompt_embeddings"]);
}

#[test]
fn peft_prefix_fixture_reproduces_its_logits() {
    testkit::check_peft_fixture(graft_plugin_prefix_tuning::method(), "prefix_minilm").unwrap();
}
