//! LoRA through the whole BERT: gradients, training, save/reload, merge, and the PEFT fixture.
use graft_peft::candle::{DType, Device, Tensor};
use graft_peft::loader::{LoadedPlugin, Registry};
use graft_peft::serde_json::{self, json};
use graft_trainer::task::Classifier;
use graft_trainer::testkit;

fn settings() -> serde_json::Value {
    json!({ "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"] })
}

#[test]
fn finite_differences_agree_with_autograd_in_f64_for_every_lora_tensor() {
    let lora = graft_plugin_lora::method();
    let classifier = testkit::classifier(lora.as_ref(), &settings(), DType::F64, 24, 7).unwrap();
    // B starts at zero, which would leave A without gradient: give every B random values.
    let mut rng = graft_peft::graft_model::init::seeded_rng(3);
    for (name, var) in classifier.trainable() {
        if name.contains("lora_B") {
            let random = graft_peft::graft_model::init::normal(
                &mut rng,
                var.dims(),
                0.05,
                DType::F64,
                &Device::Cpu,
            )
            .unwrap();
            var.set(&random).unwrap();
        }
    }
    let (texts, labels) = testkit::real_batch(2).unwrap();
    let samples = testkit::finite_difference_check(
        &classifier,
        &texts,
        &labels,
        |name| name.contains("lora_"),
        2,
        1e-5,
        11,
    )
    .unwrap();
    assert_eq!(samples.len(), 24 * 2, "every LoRA tensor sampled");
    for s in &samples {
        assert!(
            s.relative_error() <= 1e-3,
            "{} [{}]: autograd {} vs finite difference {}",
            s.tensor,
            s.index,
            s.autograd,
            s.numeric
        );
    }
    assert!(
        samples.iter().any(|s| s.autograd.abs() > 1e-6),
        "gradients are not all ~0"
    );
}

#[test]
fn trains_on_a_real_batch_and_every_tensor_gets_a_gradient() {
    let lora = graft_plugin_lora::method();
    let mut classifier =
        testkit::classifier(lora.as_ref(), &settings(), DType::F32, 64, 1).unwrap();
    let (texts, labels) = testkit::real_batch(8).unwrap();
    let (losses, silent) = testkit::train_steps(&mut classifier, &texts, &labels, 6, 1e-2).unwrap();
    // Step 1: B = 0, so A's gradient is zero as in PEFT; from step 2 on every tensor has one.
    assert!(
        silent.is_empty(),
        "no gradient at the last step: {silent:?}"
    );
    assert_eq!(classifier.trainable().len(), 24 + 2);
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.9),
        "loss did not fall: {losses:?}"
    );
}

#[test]
fn saved_adapter_reloads_to_identical_logits_and_merges_to_the_same_logits() {
    let lora = graft_plugin_lora::method();
    let mut classifier =
        testkit::classifier(lora.as_ref(), &settings(), DType::F32, 64, 5).unwrap();
    let (texts, labels) = testkit::real_batch(4).unwrap();
    testkit::train_steps(&mut classifier, &texts, &labels, 3, 1e-2).unwrap();
    let before = classifier.logits(&texts).unwrap();

    let dir = tempfile::tempdir().unwrap();
    classifier.save(dir.path()).unwrap();
    let mut registry = Registry::default();
    registry
        .add(LoadedPlugin::statically_linked(graft_plugin_lora::method()))
        .unwrap();
    let mut reloaded = Classifier::open(dir.path(), &registry, &Device::Cpu).unwrap();
    let after = reloaded.logits(&texts).unwrap();
    assert_eq!(testkit::max_abs_diff(&before, &after).unwrap(), 0.0);

    reloaded.set_merged(true).unwrap();
    let merged = reloaded.logits(&texts).unwrap();
    let diff = testkit::max_abs_diff(&before, &merged).unwrap();
    assert!(diff <= 1e-5, "merged vs unmerged: {diff}");
    reloaded.set_merged(false).unwrap();
    let unmerged = reloaded.logits(&texts).unwrap();
    assert!(testkit::max_abs_diff(&before, &unmerged).unwrap() <= 1e-5);
}

/// The fixture's tokenisation, from expected_logits.json.
fn fixture_inputs(expected: &serde_json::Value) -> graft_peft::graft_model::bert::Inputs {
    let matrix = |key: &str| -> Tensor {
        let rows: Vec<Vec<u32>> = serde_json::from_value(expected[key].clone()).unwrap();
        Tensor::new(rows, &Device::Cpu).unwrap()
    };
    graft_peft::graft_model::bert::Inputs {
        input_ids: matrix("input_ids"),
        attention_mask: matrix("attention_mask"),
        token_type_ids: Some(matrix("token_type_ids")),
    }
}

#[test]
fn peft_lora_fixture_reproduces_its_logits() {
    let fixture = testkit::workspace_root().join("../shared/fixtures/lora_minilm");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("expected_logits.json"))
            .expect("../shared/fixtures/lora_minilm/expected_logits.json"),
    )
    .unwrap();
    let mut registry = Registry::default();
    registry
        .add(LoadedPlugin::statically_linked(graft_plugin_lora::method()))
        .unwrap();
    let classifier = Classifier::open_with_spec(
        &fixture,
        testkit::spec("lora", 32).unwrap(),
        &registry,
        &Device::Cpu,
    )
    .unwrap();
    let logits = classifier
        .model
        .forward(&fixture_inputs(&expected), classifier.hooks())
        .unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    let want = Tensor::new(want, &Device::Cpu).unwrap();
    let diff = testkit::max_abs_diff(&logits, &want).unwrap();
    assert!(
        diff <= 1e-4,
        "max abs diff {diff} to PEFT's logits; ours {logits}"
    );
    // The adapter matters at this tolerance: the same head without LoRA is 4e-3 away.
    let without: Vec<Vec<f32>> = serde_json::from_value(
        expected["diagnostics"]["logits_if_adapter_ignored_but_saved_head_used"].clone(),
    )
    .unwrap();
    let without = Tensor::new(without, &Device::Cpu).unwrap();
    assert!(testkit::max_abs_diff(&logits, &without).unwrap() > 1e-3);
}
