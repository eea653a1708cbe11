//! LoRA's dropout as a `--features cuda` build makes it (on the device, from keys the
//! generator draws): this binary sets `GRAFT_REFERENCE_OPS=1` before any op runs, and gradient
//! checkpointing must recompute every block with its forward's masks.
use graft_peft::serde_json::json;
use graft_testkit as testkit;

#[test]
fn checkpointing_replays_device_drawn_dropout() {
    std::env::set_var("GRAFT_REFERENCE_OPS", "1");
    assert!(
        graft_peft::graft_model::ops::reference_forced(),
        "an op ran before GRAFT_REFERENCE_OPS was set"
    );
    let lora = graft_plugin_lora::method();
    let settings = json!({ "r": 4, "lora_alpha": 8, "lora_dropout": 0.1 });
    for family in [testkit::Family::Llama, testkit::Family::ChatGlm] {
        testkit::check_lm_checkpointing(lora.as_ref(), &settings, family, |lm| {
            testkit::randomize_vars(&lm.trainable(), |k| k.contains("lora_B"), 0.05, 3)
        })
        .unwrap();
    }
}
