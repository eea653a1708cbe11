//! DoRA against graft's method test kit, and its merge against its forward.
use graft_peft::serde_json::{self, json};
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({ "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"] })
}

/// A, B and the magnitude of 12 sites. B starts at zero, which would leave A without
/// gradient: the gradient checks randomise it.
fn suite(settings: serde_json::Value) -> testkit::Suite {
    testkit::Suite::new(graft_plugin_dora::method, settings, (2, 12 * 3), (6, 1e-2))
        .randomizing(|k| k.contains("lora_B"), 0.05)
        .merging(1e-5)
}

/// The exact derivative (norm included) is what finite differences measure; the default
/// detached norm is PEFT's deliberate approximation.
fn exact() -> serde_json::Value {
    let mut exact = settings();
    exact["norm_gradient"] = json!(true);
    exact
}

graft_testkit::method_tests!(exact_norm_gradient, suite(exact()), [gradients]);
graft_testkit::method_tests!(standard, suite(settings()), [trains, reloads]);
