//! LoRA through the whole BERT with the shared method checks: gradients, training,
//! save/reload, merge, and the PEFT fixture.
use graft_peft::serde_json::{self, json};
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({ "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"] })
}

/// B starts at zero, which would leave A without gradient: the gradient checks randomise it.
/// In training, step 1 has B = 0, so A's gradient is zero as in PEFT; from step 2 on every
/// tensor has one. On the decoders, PEFT's default targets for each (q_proj and v_proj;
/// ChatGLM's query_key_value), with dropout, so that gradient checkpointing is checked to
/// recompute each block with its forward's masks.
fn suite() -> testkit::Suite {
    testkit::Suite::new(graft_plugin_lora::method, settings(), (2, 24), (6, 1e-2))
        .randomizing(|k| k.contains("lora_B"), 0.05)
        .merging(1e-5)
        .on_decoders(
            json!({ "r": 4, "lora_alpha": 8, "lora_dropout": 0.1 }),
            (8, 1e-2),
        )
}

graft_testkit::method_tests!(
    standard,
    suite(),
    [
        gradients,
        trains,
        tags,
        reloads,
        decoders,
        decoder_classifier
    ]
);

#[test]
fn peft_lora_fixture_reproduces_its_logits() {
    // The adapter moves the logits by about 4e-3, so 1e-4 tells it from no adapter.
    testkit::check_peft_fixture(graft_plugin_lora::method(), "lora_minilm").unwrap();
}

/// Generation with the adapter's hooks and with the adapter merged into the weights agree.
#[test]
fn generation_is_the_same_merged_and_unmerged() {
    use graft_peft::candle::Device;
    use graft_trainer::lm::CausalLm;
    let scratch = tempfile::tempdir().unwrap();
    let spec = testkit::lm_spec("lora", testkit::Family::Llama, scratch.path()).unwrap();
    let lora = graft_plugin_lora::method();
    let mut lm = CausalLm::create(
        spec,
        lora.as_ref(),
        &json!({ "r": 4, "lora_alpha": 8 }),
        &Device::Cpu,
        2,
        0,
    )
    .unwrap();
    // B = 0 would make the adapter a no-op; a real update changes the story.
    testkit::randomize_vars(&lm.trainable(), |k| k.contains("lora_B"), 0.2, 5).unwrap();
    let greedy = graft_peft::graft_model::generate::Sampling::greedy();
    let prompt = "Once upon a time";
    let with_hooks = lm.generate(prompt, 40, &greedy, &mut |_| {}).unwrap();
    lm.set_merged(true).unwrap();
    let merged = lm.generate(prompt, 40, &greedy, &mut |_| {}).unwrap();
    lm.set_merged(false).unwrap();
    assert_eq!(with_hooks, merged);
    let base = graft_trainer::lm::generate_text(
        &lm.model,
        &graft_peft::graft_model::NoHooks,
        &lm.tokenizer,
        &lm.spec.template,
        prompt,
        40,
        &greedy,
        &mut |_| {},
    )
    .unwrap();
    assert_ne!(
        with_hooks, base,
        "the adapter changes nothing: the check proves nothing"
    );
}

/// Gradient accumulation through the training loop is exact on both decoder families (see
/// `graft_testkit::check_accumulation`); LoRA's B randomised so that A has a gradient.
#[test]
fn accumulated_micro_batches_give_the_whole_batch_gradients() {
    suite()
        .check_accumulation(&json!({ "r": 4, "lora_alpha": 8 }))
        .unwrap();
}

/// train-lm on an f16 base with gradient checkpointing, through the training loop: the loss is
/// scaled for the backward (f16 gradients underflow otherwise), the steps learn, and the
/// trained LoRA tensors are f32; the adapter it keeps reopens in f16, as its task file says.
#[test]
fn causal_lm_trains_on_an_f16_base_with_checkpointing() {
    use graft_peft::candle::{DType, Device};
    use graft_trainer::config::Precision;
    use graft_trainer::lm::CausalLm;
    let scratch = tempfile::tempdir().unwrap();
    let spec = graft_trainer::lm::LmSpec {
        dtype: Precision::F16,
        ..testkit::lm_spec("lora", testkit::Family::Llama, scratch.path()).unwrap()
    };
    let train = graft_trainer::config::TrainSection {
        max_steps: 12,
        batch_size: 4,
        lr: 2e-2,
        ..Default::default()
    };
    let settings = json!({ "r": 4, "lora_alpha": 8 });
    let mut config = testkit::lm_config(
        &spec,
        &settings,
        &testkit::story_pairs(4),
        train,
        scratch.path(),
    )
    .unwrap();
    config.model.checkpointing = true;
    let registry = testkit::registry_of(graft_plugin_lora::method()).unwrap();
    let out = scratch.path().join("run");
    let outcome = graft_trainer::lm_train::train(&config, &registry, &out).unwrap();
    let losses = outcome.losses;
    eprintln!("f16 with checkpointing: {losses:?}");
    assert!(
        losses[losses.len() - 1] < 0.8 * losses[0],
        "the loss did not fall by 20%: {losses:?}"
    );
    let reopened = CausalLm::open(&out, &registry, &Device::Cpu).unwrap();
    assert_eq!(reopened.model.dtype(), DType::F16);
    assert!(reopened
        .trainable()
        .iter()
        .all(|(_, v)| v.dtype() == DType::F32));
}

/// Classification on a bf16 MiniLM: the LoRA tensors and the head train in f32, every one
/// receives a gradient, and the loss falls.
#[test]
fn classifier_trains_on_a_bf16_base() {
    use graft_peft::candle::DType;
    let lora = graft_plugin_lora::method();
    let settings = json!({ "r": 8, "lora_alpha": 16 });
    let mut classifier = testkit::classifier(lora.as_ref(), &settings, DType::BF16, 64, 1).unwrap();
    let (texts, labels) = testkit::real_batch(8).unwrap();
    let (losses, silent) = testkit::train_steps(&mut classifier, &texts, &labels, 8, 1e-2).unwrap();
    eprintln!("bf16 classifier: {losses:?}");
    assert!(silent.is_empty(), "no gradient for {silent:?}");
    assert!(losses[losses.len() - 1] < 0.9 * losses[0], "{losses:?}");
    let trainable = classifier.trainable();
    assert!(
        trainable.iter().all(|(_, v)| v.dtype() == DType::F32),
        "every trained tensor f32"
    );
}

/// `graft inspect`'s bytes against the tensors a real LoRA step holds, on the random ChatGLM
/// (r 8 on query_key_value, as ChatGLM2-6B's recipe) in bf16, and on a q4_k Llama: the base
/// weights as loaded (every tensor in its dtype, the projections in their blocks), the
/// trainable tensors with their gradients and AdamW's moments after one step, and the largest
/// projection weight dequantized in the activations' dtype.
#[test]
fn inspect_counts_the_tensors_a_lora_step_holds() {
    use graft_peft::candle::{DType, Device};
    use graft_peft::graft_model::quant::Quantization;
    use graft_peft::TargetModules;
    use graft_trainer::config::Precision;
    use graft_trainer::inspect::{inspect, StepShape};
    use graft_trainer::lm::{CausalLm, LmSpec};
    use graft_trainer::optim::{AdamW, ParamGroup};
    let scratch = tempfile::tempdir().unwrap();
    let lora = graft_plugin_lora::method();
    let settings = json!({ "r": 8, "lora_alpha": 16, "target_modules": ["query_key_value"] });
    let bytes = |t: &graft_peft::candle::Tensor| t.elem_count() * t.dtype().size_in_bytes();
    for (family, quantize) in [
        (testkit::Family::ChatGlm, None),
        (testkit::Family::QuantizableLlama, Some(Quantization::Q4K)),
    ] {
        let spec = LmSpec {
            dtype: Precision::Bf16,
            quantize,
            ..testkit::lm_spec("lora", family, scratch.path()).unwrap()
        };
        let targets = match family {
            testkit::Family::ChatGlm => Some(TargetModules::Names(vec!["query_key_value".into()])),
            _ => None,
        };
        let settings = match family {
            testkit::Family::ChatGlm => settings.clone(),
            _ => json!({ "r": 8, "lora_alpha": 16 }),
        };
        let lm =
            CausalLm::create(spec.clone(), lora.as_ref(), &settings, &Device::Cpu, 1, 1).unwrap();
        let batch = graft_tokenizer::encode_causal(
            &lm.tokenizer,
            &lm.spec.template,
            &testkit::story_pairs(1),
            lm.spec.max_len,
        )
        .unwrap();
        let shape = StepShape {
            batch: batch.batch,
            seq_len: batch.seq_len,
            dtype: DType::BF16,
            checkpointing: true,
            quantize,
            labelled: None,
            // The whole largest weight dequantized, as the composed ops hold it.
            composed_ops: true,
            prefix: 0,
        };
        let report = inspect(&spec.model, targets, 8, shape).unwrap();
        let name = format!("{family:?}, quantized {quantize:?}");

        let quantized = lm.model.quantized();
        let held: usize = lm
            .model
            .params()
            .iter()
            .map(|p| bytes(p.value()))
            .sum::<usize>()
            + quantized
                .iter()
                .map(|(_, q)| q.size_in_bytes())
                .sum::<usize>();
        assert_eq!(report.memory.weights, held, "{name}: base weights");
        let largest_dequantized = quantized
            .iter()
            .map(|(_, q)| bytes(&q.dequantize().unwrap().to_dtype(DType::BF16).unwrap()))
            .max()
            .unwrap_or(0);
        assert_eq!(
            report.memory.dequantized, largest_dequantized,
            "{name}: the largest dequantized weight"
        );

        let vars: Vec<_> = lm.trainable().into_iter().map(|(_, v)| v).collect();
        let mut optimizer = AdamW::new(
            vec![ParamGroup {
                vars: vars.clone(),
                lr: 1e-3,
                weight_decay: 0.0,
            }],
            0.9,
            0.999,
            1e-8,
        )
        .unwrap();
        let (_, grads) = lm.loss_and_grads(&batch, true, 1.0).unwrap();
        optimizer.step(&grads, 1.0).unwrap();
        let trainable: usize = vars
            .iter()
            .map(|v| bytes(v.as_tensor()) + bytes(grads.get(v.as_tensor()).expect("a gradient")))
            .sum::<usize>()
            + optimizer
                .state()
                .1
                .iter()
                .map(|(_, t)| bytes(t))
                .sum::<usize>();
        assert_eq!(
            report.memory.trainable, trainable,
            "{name}: trainable tensors"
        );
        assert_eq!(
            report.lora_trainable,
            vars.iter().map(|v| v.elem_count()).sum::<usize>(),
            "{name}: LoRA values"
        );
    }
}
