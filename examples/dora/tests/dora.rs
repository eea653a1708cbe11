//! DoRA against graft's method test kit, and its merge against its forward.
use graft_peft::serde_json::{self, json};
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({ "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"] })
}

#[test]
fn gradients_agree_with_finite_differences() {
    let method = graft_plugin_dora::method();
    // The exact derivative (norm included) is what finite differences measure; the default
    // detached norm is PEFT's deliberate approximation. B starts at zero, which would leave A
    // without gradient.
    let mut exact = settings();
    exact["norm_gradient"] = json!(true);
    let samples = testkit::check_gradients(method.as_ref(), &exact, 2, |c| {
        testkit::randomize(c, |k| k.contains("lora_B"), 0.05, 3)
    })
    .unwrap();
    assert_eq!(
        samples.len(),
        12 * 3 * 2,
        "A, B and the magnitude of 12 sites"
    );
}

#[test]
fn trains_on_a_real_batch() {
    let method = graft_plugin_dora::method();
    testkit::check_trains(method.as_ref(), &settings(), 6, 1e-2).unwrap();
}

#[test]
fn reloads_to_identical_logits_and_merged_weights_equal_the_forward() {
    let method = graft_plugin_dora::method();
    let mut reloaded =
        testkit::check_reload(method.as_ref(), &settings(), graft_plugin_dora::method()).unwrap();
    testkit::check_merge(&mut reloaded, 1e-5).unwrap();
}
