//! P-tuning through the whole BERT with the shared method checks: gradients, training and
//! save/reload for both prompt encoders, and ragged batches.
use graft_peft::candle::DType;
use graft_peft::serde_json::{self, json};
use graft_testkit as testkit;

fn mlp() -> serde_json::Value {
    json!({ "num_virtual_tokens": 4, "encoder_hidden_size": 16 })
}

fn lstm() -> serde_json::Value {
    json!({
        "num_virtual_tokens": 4,
        "encoder_reparameterization_type": "LSTM",
        "encoder_hidden_size": 8,
        "encoder_num_layers": 2,
    })
}

/// The MLP encoder: the embedding and 3 linear layers (weight, bias).
fn mlp_suite() -> testkit::Suite {
    testkit::Suite::new(graft_plugin_p_tuning::method, mlp(), (2, 7), (4, 2e-2))
        .on_decoders(mlp(), (15, 5e-2))
}

/// The LSTM encoder: the embedding, 2 layers x 2 directions x 4, and 2 head linear layers
/// (weight, bias).
fn lstm_suite() -> testkit::Suite {
    testkit::Suite::new(
        graft_plugin_p_tuning::method,
        lstm(),
        (2, 1 + 16 + 4),
        (4, 2e-2),
    )
}

graft_testkit::method_tests!(
    mlp_encoder,
    mlp_suite(),
    [gradients, trains, tags, decoders]
);
graft_testkit::method_tests!(lstm_encoder, lstm_suite(), [gradients, trains]);

#[test]
fn saved_mlp_adapter_reloads_to_identical_logits() {
    let reloaded = mlp_suite().check_reload().unwrap();
    // The reloaded adapter is the saved table, as in PEFT.
    let names = testkit::keys(&reloaded.classifier.adapter.trainable());
    assert_eq!(names, ["prompt_embeddings"]);
}

#[test]
fn saved_lstm_adapter_reloads_to_identical_logits() {
    let reloaded = lstm_suite().check_reload().unwrap();
    let config = reloaded.classifier.adapter.config_json();
    assert_eq!(config["encoder_reparameterization_type"], "LSTM");
    assert_eq!(config["token_dim"], 384);
    assert_eq!(config["encoder_hidden_size"], 8);
}

/// The virtual tokens shift every text's positions and widen its mask the same way whether it
/// runs alone or padded in a batch: padding must not leak into the shorter text's logits.
#[test]
fn ragged_batch_gives_each_text_its_logits_alone() {
    let method = graft_plugin_p_tuning::method();
    for settings in [mlp(), lstm()] {
        let classifier =
            testkit::classifier(method.as_ref(), &settings, DType::F32, 64, 3).unwrap();
        let texts = vec![
            "A short title. Few words.".to_string(),
            "A much longer title about cardiology. The abstract goes on for a while about \
             patients, trials, outcomes and many other things that take tokens."
                .to_string(),
        ];
        let together = classifier.logits(&texts).unwrap();
        for (i, text) in texts.iter().enumerate() {
            let alone = classifier.logits(std::slice::from_ref(text)).unwrap();
            let row = together.narrow(0, i, 1).unwrap();
            let diff = testkit::max_abs_diff(&row, &alone).unwrap();
            assert!(diff <= 1e-5, "text {i}: batched vs alone differ by {diff}");
        }
    }
}
