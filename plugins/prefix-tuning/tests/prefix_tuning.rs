//! Prefix tuning through the whole BERT with the shared method checks, the PEFT fixture, and
//! the attention properties of key/value prefixes.
use graft_peft::serde_json::{self, json};
use graft_plugin_prefix_tuning::method;
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({ "num_virtual_tokens": 4 })
}

fn projected() -> serde_json::Value {
    json!({ "num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16 })
}

fn plain() -> testkit::Suite {
    testkit::Suite::new(method, settings(), (3, 1), (6, 3e-2)).on_decoders(settings(), (15, 5e-2))
}

/// The embedding and both projection layers (weight, bias) are sampled.
fn projected_suite() -> testkit::Suite {
    testkit::Suite::new(method, projected(), (2, 5), (6, 1e-2)).on_decoders(projected(), (15, 5e-2))
}

graft_testkit::method_tests!(
    without_projection,
    plain(),
    [gradients, trains, tags, reloads, decoders]
);
graft_testkit::method_tests!(
    with_projection,
    projected_suite(),
    [gradients, trains, decoders]
);

#[test]
fn saved_adapter_reloads_to_identical_logits_and_the_projection_is_folded_in() {
    let reloaded = projected_suite().check_reload().unwrap();
    let keys = testkit::keys(&reloaded.classifier.adapter.tensors().unwrap());
    assert_eq!(keys, ["prompt_embeddings"]);
}

#[test]
fn peft_prefix_fixture_reproduces_its_logits() {
    testkit::check_peft_fixture(graft_plugin_prefix_tuning::method(), "prefix_minilm").unwrap();
}

mod properties {
    //! How key/value prefixes meet the attention mask, on the real model.
    use graft_peft::candle::{DType, Tensor};
    use graft_peft::serde_json::json;
    use graft_testkit as testkit;
    use graft_trainer::task::Classifier;
    use proptest::prelude::*;

    fn classifier(n: usize, seed: u64) -> Classifier {
        let method = graft_plugin_prefix_tuning::method();
        testkit::classifier(
            method.as_ref(),
            &json!({ "num_virtual_tokens": n }),
            DType::F32,
            32,
            seed,
        )
        .unwrap()
    }

    /// Two rows of different lengths, so the shorter one is padded.
    fn ragged_texts(words: usize) -> Vec<String> {
        let (texts, _) = testkit::real_batch(2).unwrap();
        let short: Vec<&str> = texts[0].split_whitespace().take(words).collect();
        vec![short.join(" "), texts[1].clone()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]

        #[test]
        fn changing_a_padded_token_changes_no_output(
            n in 1usize..6,
            words in 1usize..8,
            seed in 0u64..1000,
            replacement in 1000u32..30000,
        ) {
            let classifier = classifier(n, seed);
            let mut encoded = classifier.tokenizer.encode_batch(&ragged_texts(words)).unwrap();
            let before = classifier.model.forward(&classifier.inputs(&encoded).unwrap(), classifier.hooks()).unwrap();
            let mut changed = 0;
            for (id, mask) in encoded.input_ids.iter_mut().zip(&encoded.attention_mask) {
                if *mask == 0 {
                    *id = replacement;
                    changed += 1;
                }
            }
            prop_assert!(changed > 0, "the batch has padding");
            let after = classifier.model.forward(&classifier.inputs(&encoded).unwrap(), classifier.hooks()).unwrap();
            prop_assert_eq!(testkit::max_abs_diff(&before, &after).unwrap(), 0.0);
        }

        #[test]
        fn every_real_token_attends_to_every_prefix_position(
            n in 1usize..5,
            layer in 0usize..6,
            words in 1usize..8,
            seed in 0u64..1000,
        ) {
            let classifier = classifier(n, seed);
            let encoded = classifier.tokenizer.encode_batch(&ragged_texts(words)).unwrap();
            let inputs = classifier.inputs(&encoded).unwrap();
            let hidden = |c: &Classifier| c.model.bert().unwrap().forward(&inputs, c.hooks()).unwrap().0;
            let before = hidden(&classifier);
            let table = classifier.adapter.trainable()[0].1.clone();
            let original = table.as_tensor().copy().unwrap();
            let h = classifier.model.bert().unwrap().config().hidden_size;
            for position in 0..n {
                // Move this position's value vector of `layer` (row block 2 * layer + 1).
                let mut rows = original.to_vec2::<f32>().unwrap();
                for v in &mut rows[position][(2 * layer + 1) * h..(2 * layer + 2) * h] {
                    *v += 1.0;
                }
                table.set(&Tensor::new(rows, original.device()).unwrap()).unwrap();
                let after = hidden(&classifier);
                let moved = (after - &before).unwrap().abs().unwrap().sum(2).unwrap();
                let moved = moved.to_vec2::<f32>().unwrap();
                for (row, mask) in encoded.attention_mask.chunks(encoded.seq_len).enumerate() {
                    for (t, &m) in mask.iter().enumerate() {
                        if m == 1 {
                            prop_assert!(moved[row][t] > 0.0, "row {row} token {t} does not see prefix position {position} of layer {layer}");
                        }
                    }
                }
            }
            table.set(&original).unwrap();
        }
    }
}
