//! P-tuning v2 through the whole BERT with the shared method checks; its files are PEFT's
//! prefix tuning, so the prefix-tuning plugin reads them too.
use graft_peft::candle::Device;
use graft_peft::serde_json::{self, json};
use graft_plugin_p_tuning_v2::method;
use graft_testkit as testkit;
use graft_trainer::task::{Classifier, TaskSpec};

fn settings() -> serde_json::Value {
    json!({ "num_virtual_tokens": 4, "prefix_dropout": 0.1 })
}

/// Training runs with the prefix dropout on; on the decoders it is the method's default (0.1),
/// which gradient checkpointing is checked to replay.
fn suite() -> testkit::Suite {
    testkit::Suite::new(method, settings(), (4, 1), (6, 3e-2))
        .on_decoders(json!({ "num_virtual_tokens": 4 }), (15, 5e-2))
}

graft_testkit::method_tests!(standard, suite(), [gradients, trains, tags, decoders]);

/// Gradient accumulation through the training loop is exact on both decoder families (see
/// `graft_testkit::check_accumulation`), with the prefix dropout off.
#[test]
fn accumulated_micro_batches_give_the_whole_batch_gradients() {
    suite()
        .check_accumulation(&json!({ "num_virtual_tokens": 4, "prefix_dropout": 0.0 }))
        .unwrap();
}

#[test]
fn saved_adapter_reloads_to_identical_logits_also_as_peft_prefix_tuning() {
    let reloaded = suite().check_reload().unwrap();
    let dir = tempfile::tempdir().unwrap();
    reloaded.classifier.save(dir.path()).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "PREFIX_TUNING");
    assert_eq!(config["prefix_projection"], false);
    assert!(
        config.get("prefix_dropout").is_none(),
        "PEFT has no such field"
    );
    // The same files opened as plain prefix tuning give the same logits.
    let spec = TaskSpec {
        method: "prefix-tuning".into(),
        ..TaskSpec::read(dir.path()).unwrap()
    };
    let registry = testkit::registry_of(graft_plugin_prefix_tuning::method()).unwrap();
    let as_prefix = Classifier::open_with_spec(dir.path(), spec, &registry, &Device::Cpu).unwrap();
    let logits = as_prefix.logits(&reloaded.texts).unwrap();
    assert_eq!(
        testkit::max_abs_diff(&logits, &reloaded.logits).unwrap(),
        0.0
    );
}

/// An adapter in the layout THUDM's ChatGLM P-tuning v2 scripts save (the prefix table under
/// `transformer.prefix_encoder.embedding.weight`, its length as `pre_seq_len`) opens on ChatGLM
/// to the same logits, and the prefixes matter.
#[test]
fn reads_thudm_chatglm_p_tuning_v2_layout() {
    use graft_peft::graft_model::NoHooks;
    use graft_trainer::lm::CausalLm;
    let scratch = tempfile::tempdir().unwrap();
    let spec = testkit::lm_spec("p-tuning-v2", testkit::Family::ChatGlm, scratch.path()).unwrap();
    let method = graft_plugin_p_tuning_v2::method();
    let lm = CausalLm::create(spec, method.as_ref(), &settings(), &Device::Cpu, 3, 10).unwrap();
    let dir = scratch.path().join("thudm");
    lm.save(&dir).unwrap();
    let file = dir.join("adapter_model.safetensors");
    let mut tensors = graft_peft::candle::safetensors::load(&file, &Device::Cpu).unwrap();
    let table = tensors.remove("prompt_embeddings").expect("PEFT's key");
    tensors.insert(graft_peft::prompt_learning::THUDM_PREFIX.to_string(), table);
    graft_peft::candle::safetensors::save(&tensors, &file).unwrap();
    let config_file = dir.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    let n = config["num_virtual_tokens"].take();
    config["pre_seq_len"] = n;
    config.as_object_mut().unwrap().remove("num_virtual_tokens");
    std::fs::write(&config_file, config.to_string()).unwrap();

    let registry = testkit::registry_of(graft_plugin_p_tuning_v2::method()).unwrap();
    let reopened = CausalLm::open(&dir, &registry, &Device::Cpu).unwrap();
    let batch = graft_tokenizer::encode_causal(
        &lm.tokenizer,
        &lm.spec.template,
        &testkit::story_pairs(2),
        lm.spec.max_len,
    )
    .unwrap();
    let logits = lm.logits(&batch).unwrap();
    let diff = testkit::max_abs_diff(&logits, &reopened.logits(&batch).unwrap()).unwrap();
    assert_eq!(diff, 0.0);
    let inputs = graft_peft::graft_model::decoder::DecoderInputs {
        input_ids: graft_peft::candle::Tensor::from_slice(
            &batch.input_ids,
            (batch.batch, batch.seq_len),
            &Device::Cpu,
        )
        .unwrap(),
        attention_mask: Some(
            graft_peft::candle::Tensor::from_slice(
                &batch.attention_mask,
                (batch.batch, batch.seq_len),
                &Device::Cpu,
            )
            .unwrap(),
        ),
    };
    let hidden = lm.model.forward(&inputs, &NoHooks, None).unwrap();
    let bare = lm.model.lm_head(&hidden, &NoHooks).unwrap();
    assert!(testkit::max_abs_diff(&logits, &bare).unwrap() > 1e-3);
}
