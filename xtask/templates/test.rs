//! The checks every graft method passes (graft-testkit's standard suite), run against this
//! plugin.
use graft_peft::serde_json::json;
use graft_testkit::Suite;

/// Bias deltas on MiniLM's query and value in each of its 6 layers: 12 tensors, 2 entries
/// each in the gradient check; 6 training steps at 1e-2; merged within 1e-5.
fn suite() -> Suite {
    Suite::new(__CRATE__::method, json!({}), (2, 12), (6, 1e-2)).merging(1e-5)
}

graft_testkit::method_tests!(standard, suite(), [gradients, trains, reloads]);
