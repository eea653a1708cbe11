//! The checks every graft method passes (graft_testkit), run against this plugin.
use graft_peft::serde_json::json;
use graft_testkit as testkit;

#[test]
fn gradients_agree_with_finite_differences() {
    let method = __CRATE__::method();
    testkit::check_gradients(method.as_ref(), &json!({}), 2, |_| Ok(())).unwrap();
}

#[test]
fn trains_on_a_real_batch() {
    let method = __CRATE__::method();
    testkit::check_trains(method.as_ref(), &json!({}), 6, 1e-2).unwrap();
}

#[test]
fn reloads_to_identical_logits_and_merges_to_the_same_logits() {
    let method = __CRATE__::method();
    let mut reloaded =
        testkit::check_reload(method.as_ref(), &json!({}), __CRATE__::method()).unwrap();
    testkit::check_merge(&mut reloaded, 1e-5).unwrap();
}
