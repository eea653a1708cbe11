//! AdaLoRA through the whole BERT with the shared method checks (gradients, training,
//! save/reload, merge), plus rank allocation inside a real training run.
use graft_peft::candle::{DType, Device, Tensor};
use graft_peft::serde_json::{self, json, Value};
use graft_testkit as testkit;
use graft_trainer::task::Classifier;

/// 12 sites (6 layers x query, value) of rank 4 pruned towards 2.
const SITES: usize = 12;

fn settings() -> Value {
    json!({ "init_r": 4, "target_r": 2, "lora_alpha": 8, "target_modules": ["query", "value"] })
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Non-zero entries of every E.
fn nonzero_e(classifier: &Classifier) -> usize {
    classifier
        .adapter
        .trainable()
        .iter()
        .filter(|(k, _)| k.ends_with("lora_E"))
        .map(|(_, v)| {
            let values = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            values.iter().filter(|&&x| x != 0.0).count()
        })
        .sum()
}

/// E starts at zero, which would leave A and B with the orthogonality gradient only: the
/// gradient checks randomise it. In training, step 1 has E = 0, so A and B get only the
/// orthogonality term's gradient, as in PEFT. The gradient check on MiniLM is its own test
/// below (it also checks that the orthogonality term is part of the loss).
fn suite() -> testkit::Suite {
    testkit::Suite::new(
        graft_plugin_adalora::method,
        settings(),
        (2, SITES * 3),
        (6, 1e-2),
    )
    .randomizing(|k| k.contains("lora_E"), 0.05)
    .merging(1e-5)
    .on_decoders(
        json!({ "init_r": 4, "target_r": 2, "lora_alpha": 8 }),
        (10, 2e-2),
    )
}

graft_testkit::method_tests!(standard, suite(), [trains, tags, reloads, decoders]);

#[test]
fn finite_differences_agree_with_autograd_in_f64_for_every_adalora_tensor() {
    let adalora = graft_plugin_adalora::method();
    // E starts at zero, which would leave A and B with the orthogonality gradient only.
    let samples = testkit::check_gradients(adalora.as_ref(), &settings(), 2, |c| {
        let extra = c.adapter.extra_loss()?.expect("the orthogonality term");
        assert!(
            scalar(&extra) > 0.1,
            "extra_loss is part of the checked loss"
        );
        testkit::randomize(c, |k| k.contains("lora_E"), 0.05, 3)
    })
    .unwrap();
    assert_eq!(samples.len(), SITES * 3 * 2, "every AdaLoRA tensor sampled");
}

#[test]
fn orthogonality_term_gradient_agrees_with_finite_differences() {
    let adalora = graft_plugin_adalora::method();
    let classifier = testkit::classifier(adalora.as_ref(), &settings(), DType::F64, 24, 2).unwrap();
    let adapter = &classifier.adapter;
    let loss = || scalar(&adapter.extra_loss().unwrap().unwrap());
    let grads = adapter.extra_loss().unwrap().unwrap().backward().unwrap();
    let mut checked = 0;
    for (name, var) in adapter
        .trainable()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("lora_E"))
    {
        let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let values = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for index in [0, values.len() / 2, values.len() - 1] {
            let set = |v: f64| {
                let mut w = values.clone();
                w[index] = v;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            };
            set(values[index] + 1e-6);
            let plus = loss();
            set(values[index] - 1e-6);
            let minus = loss();
            set(values[index]);
            let numeric = (plus - minus) / 2e-6;
            let autograd = grad.get(index).unwrap().to_scalar::<f64>().unwrap();
            let scale = numeric.abs().max(autograd.abs()).max(1e-7);
            assert!(
                (numeric - autograd).abs() / scale < 1e-4,
                "{name}[{index}]: autograd {autograd:e} vs finite difference {numeric:e}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, SITES * 2 * 3);
}

/// A schedule short enough to finish inside a test: warm-up step 1, budgeting steps 2-3, the
/// final allocation at step 4, steps 5-6 with the final pattern.
fn short_schedule() -> Value {
    let mut s = settings();
    let fields = json!({ "total_step": 6, "tinit": 1, "tfinal": 2, "deltaT": 1 });
    s.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    s
}

fn trained(steps: usize) -> (Classifier, Vec<String>) {
    let adalora = graft_plugin_adalora::method();
    let mut classifier =
        testkit::classifier(adalora.as_ref(), &short_schedule(), DType::F32, 64, 3).unwrap();
    let (texts, labels) = testkit::real_batch(4).unwrap();
    testkit::train_steps(&mut classifier, &texts, &labels, steps, 1e-2).unwrap();
    (classifier, texts)
}

#[test]
fn budget_shrinks_during_training_to_exactly_the_schedule() {
    // Step 1 is warm-up: nothing pruned, E all non-zero after one AdamW step.
    assert_eq!(nonzero_e(&trained(1).0), SITES * 4);
    // Step 2: floor((48 - 24) · (1 - 1/3)³ + 24) = 31 triplets.
    let (classifier, _) = trained(2);
    assert_eq!(nonzero_e(&classifier), 31);
    let pattern = &classifier.adapter.config_json()["rank_pattern"];
    let kept: usize = pattern
        .as_object()
        .unwrap()
        .values()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .filter(|b| b.as_bool().unwrap())
                .count()
        })
        .sum();
    assert_eq!(kept, 31);
}

#[test]
fn allocation_ends_at_target_rank_and_saves_truncated_tensors_that_reload_identically() {
    let (classifier, texts) = trained(6);
    assert_eq!(
        nonzero_e(&classifier),
        SITES * 2,
        "target_r x sites triplets remain"
    );
    let logits = classifier.logits(&texts).unwrap();

    let dir = tempfile::tempdir().unwrap();
    classifier.save(dir.path()).unwrap();
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "ADALORA");
    assert_eq!(config["total_step"], 6);
    assert_eq!(config["init_r"], 4);
    let pattern = config["rank_pattern"].as_object().unwrap();
    assert_eq!(pattern.len(), SITES);
    let saved = graft_peft::candle::safetensors::load(
        dir.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut total_rank = 0;
    for (name, kept) in pattern {
        let kept = kept.as_array().unwrap();
        assert_eq!(kept.len(), 4);
        let rank = kept.iter().filter(|b| b.as_bool().unwrap()).count();
        let site = name.strip_suffix(".lora_E").unwrap();
        let shape = |part: &str| {
            saved[&format!("base_model.model.{site}.{part}")]
                .dims()
                .to_vec()
        };
        assert_eq!(shape("lora_A"), [rank, 384]);
        assert_eq!(shape("lora_E"), [rank, 1]);
        assert_eq!(shape("lora_B"), [384, rank]);
        let e = saved[&format!("base_model.model.{site}.lora_E")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            e.iter().all(|&v| v != 0.0),
            "{site}: only kept triplets saved"
        );
        total_rank += rank;
    }
    assert_eq!(total_rank, SITES * 2);

    let registry = testkit::registry_of(graft_plugin_adalora::method()).unwrap();
    let mut reloaded = Classifier::open(dir.path(), &registry, &Device::Cpu).unwrap();
    let after = reloaded.logits(&texts).unwrap();
    assert_eq!(testkit::max_abs_diff(&logits, &after).unwrap(), 0.0);
    // Saving the reloaded adapter writes the same tensors and pattern again.
    assert_eq!(
        reloaded.adapter.config_json()["rank_pattern"],
        config["rank_pattern"]
    );
    // (A site may have lost every triplet: the budget is global, so compare values, which
    // works for empty tensors too.)
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (key, tensor) in reloaded.adapter.tensors().unwrap() {
        assert_eq!(tensor.dims(), saved[&key].dims(), "{key}");
        assert_eq!(values(&tensor), values(&saved[&key]), "{key}");
    }
    reloaded.set_merged(true).unwrap();
    let merged = reloaded.logits(&texts).unwrap();
    assert!(testkit::max_abs_diff(&logits, &merged).unwrap() <= 1e-5);
}

#[test]
fn a_schedule_without_a_length_or_a_budgeting_phase_is_refused() {
    let adalora = graft_plugin_adalora::method();
    let mut s = settings();
    s["tinit"] = json!(60);
    s["tfinal"] = json!(40);
    // testkit's classifier plans 100 steps: tinit 60 + tfinal 40 leaves no budgeting phase.
    let err = testkit::attach_error(adalora.as_ref(), &s);
    assert!(err.contains("no budgeting phase"), "{err}");
    let mut s = settings();
    s["r"] = json!(4);
    let err = testkit::attach_error(adalora.as_ref(), &s);
    assert!(err.contains("init_r"), "{err}");
}
