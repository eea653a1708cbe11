//! The `graft` command end to end: train, eval, predict, merge on the demo set (bad input:
//! tests/bad_input.rs).
use graft_peft::candle::{DType, Device};
use graft_peft::loader::Registry;
use graft_testkit as testkit;
use graft_trainer::task::Classifier;

mod common;
use common::{graft, stderr};

#[test]
fn train_eval_predict_and_merge_on_the_demo_set() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let demo = testkit::workspace_root().join("data/demo.csv");
    let demo = demo.to_str().unwrap();
    let out = graft(&[
        "train",
        "--method",
        "lora",
        "--data",
        demo,
        "--out",
        run.to_str().unwrap(),
        "--max-steps",
        "4",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "eval.json",
        "config.toml",
        "curves.svg",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    for key in ["accuracy", "precision", "recall", "f1"] {
        assert!(eval[key].is_number(), "eval.json lacks {key}");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);

    let adapter = run.join("adapter");
    let adapter_arg = adapter.to_str().unwrap();
    let eval_out = dir.path().join("eval.json");
    let out = graft(&[
        "eval",
        "--adapter",
        adapter_arg,
        "--data",
        demo,
        "--out",
        eval_out.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read_to_string(&eval_out)
        .unwrap()
        .contains("\"f1\""));

    let predictions = dir.path().join("submission.csv");
    let out = graft(&[
        "predict",
        "--adapter",
        adapter_arg,
        "--data",
        demo,
        "--out",
        predictions.to_str().unwrap(),
        "--submission",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&predictions).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("uuid,Keywords,label"));
    assert_eq!(lines.clone().count(), 40);
    assert!(lines.all(|l| l.ends_with(",0") || l.ends_with(",1")));

    let merged = dir.path().join("merged");
    let out = graft(&[
        "merge",
        "--adapter",
        adapter_arg,
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The merged model alone gives the adapter's logits.
    let mut registry = Registry::default();
    registry
        .add(graft_peft::loader::LoadedPlugin::statically_linked(
            graft_plugin_lora::method(),
        ))
        .unwrap();
    let classifier = Classifier::open(&adapter, &registry, &Device::Cpu).unwrap();
    let (texts, _) = testkit::real_batch(4).unwrap();
    let with_adapter = classifier.logits(&texts).unwrap();
    let merged_model = graft_model::models::bert::BertForSequenceClassification::load(
        &merged,
        2,
        graft_model::models::bert::Pooling::Pooler,
        DType::F32,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let encoded = classifier.tokenizer.encode_batch(&texts).unwrap();
    let inputs = classifier.inputs(&encoded).unwrap();
    let merged_logits = merged_model
        .forward(&inputs, &graft_model::NoHooks)
        .unwrap();
    let diff = testkit::max_abs_diff(&with_adapter, &merged_logits).unwrap();
    assert!(diff <= 1e-5, "merged model logits differ by {diff}");

    // candle-transformers' bert reads the merged checkpoint and agrees with graft's encoder.
    let text = std::fs::read_to_string(merged.join("config.json")).unwrap();
    let reference_config: candle_transformers::models::bert::Config =
        serde_json::from_str(&text).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[merged.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &reference_config)
        .unwrap()
        .forward(
            &inputs.input_ids,
            inputs.token_type_ids.as_ref().unwrap(),
            Some(&inputs.attention_mask),
        )
        .unwrap();
    let (hidden, _) = merged_model
        .bert
        .forward(&inputs, &graft_model::NoHooks)
        .unwrap();
    let diff = testkit::max_abs_diff(&hidden, &reference).unwrap();
    assert!(
        diff <= 1e-4,
        "candle-transformers on the merged model differs by {diff}"
    );
}

/// `graft train --method ia3` without `--config` trains with the plugin's recommended config
/// (configs/ia3.toml, embedded in the plugin), which is what `cargo xtask train --method ia3`
/// runs: the same adapter bytes as with the file given, and not those of graft's generic
/// defaults (IA3 wants a high rate and no decay).
#[test]
fn a_method_without_a_config_trains_with_its_recommended_settings() {
    let dir = tempfile::tempdir().unwrap();
    let generic = dir.path().join("generic.toml");
    std::fs::write(&generic, "[method]\nname = \"ia3\"\n").unwrap();
    let run = |name: &str, config: Option<&str>| {
        let out = dir.path().join(name);
        let mut args = vec!["train", "--method", "ia3", "--data", "data/demo.csv"];
        args.extend(["--max-steps", "3", "--out", out.to_str().unwrap()]);
        if let Some(config) = config {
            args.extend(["--config", config]);
        }
        let result = graft(&args);
        assert!(result.status.success(), "{}", stderr(&result));
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
    };
    let recommended = run("recommended", None);
    assert_eq!(recommended, run("file", Some("configs/ia3.toml")));
    assert_ne!(recommended, run("generic", Some(generic.to_str().unwrap())));
}
