//! Prompt tuning through the whole BERT with the shared method checks, every initialisation,
//! and the PEFT fixture.
use graft_peft::candle::DType;
use graft_peft::serde_json::{self, json};
use graft_plugin_prompt_tuning::method;
use graft_testkit as testkit;

fn settings() -> serde_json::Value {
    json!({ "num_virtual_tokens": 4 })
}

fn suite() -> testkit::Suite {
    testkit::Suite::new(method, settings(), (4, 1), (6, 3e-2)).on_decoders(settings(), (15, 5e-2))
}

graft_testkit::method_tests!(
    standard,
    suite(),
    [gradients, trains, tags, reloads, decoders]
);

#[test]
fn text_and_vocabulary_initialisations_start_from_word_embeddings() {
    let method = graft_plugin_prompt_tuning::method();
    let text = json!({
        "num_virtual_tokens": 5,
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "medical paper",
    });
    let classifier = testkit::classifier(method.as_ref(), &text, DType::F32, 32, 1).unwrap();
    let prompt = classifier.adapter.trainable()[0].1.as_tensor().clone();
    // [CLS] medical paper [SEP] [CLS]: the text's ids with special tokens, repeated to 5.
    let ids = classifier.tokenizer.encode("medical paper").unwrap();
    assert_eq!(ids.len(), 4);
    let table = classifier
        .model
        .bert()
        .unwrap()
        .named_tensors()
        .into_iter()
        .find(|(k, _)| k == "bert.embeddings.word_embeddings.weight")
        .unwrap()
        .1;
    let repeated: Vec<u32> = ids.iter().copied().cycle().take(5).collect();
    let want = table
        .index_select(
            &graft_peft::candle::Tensor::new(repeated, &graft_peft::candle::Device::Cpu).unwrap(),
            0,
        )
        .unwrap();
    assert_eq!(testkit::max_abs_diff(&prompt, &want).unwrap(), 0.0);

    let sampled = json!({ "num_virtual_tokens": 3, "prompt_tuning_init": "SAMPLE_VOCAB" });
    let classifier = testkit::classifier(method.as_ref(), &sampled, DType::F32, 32, 1).unwrap();
    let prompt = classifier.adapter.trainable()[0].1.as_tensor().clone();
    for row in 0..3 {
        let row = prompt.get(row).unwrap();
        let distances = table
            .broadcast_sub(&row)
            .unwrap()
            .abs()
            .unwrap()
            .sum(1)
            .unwrap()
            .min(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(distances, 0.0, "every sampled row is a vocabulary row");
    }

    let missing = json!({ "prompt_tuning_init": "TEXT" });
    let err = testkit::attach_error(method.as_ref(), &missing);
    assert!(err.contains("prompt_tuning_init_text"), "{err}");
}

#[test]
fn peft_prompt_fixture_reproduces_its_logits() {
    testkit::check_peft_fixture(graft_plugin_prompt_tuning::method(), "prompt_minilm").unwrap();
}

mod properties {
    //! Virtual tokens shift positions and widen masks the same way for every row of a batch.
    use graft_peft::candle::DType;
    use graft_peft::serde_json::json;
    use graft_testkit as testkit;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]

        #[test]
        fn each_row_of_a_ragged_batch_gives_the_logits_it_gives_alone(
            n in 1usize..6,
            lengths in proptest::collection::vec(1usize..40, 1..4),
            seed in 0u64..1000,
        ) {
            let method = graft_plugin_prompt_tuning::method();
            let classifier = testkit::classifier(
                method.as_ref(),
                &json!({ "num_virtual_tokens": n }),
                DType::F32,
                48,
                seed,
            )
            .unwrap();
            let (rows, _) = testkit::real_batch(lengths.len()).unwrap();
            let texts: Vec<String> = rows
                .iter()
                .zip(&lengths)
                .map(|(text, &words)| text.split_whitespace().take(words).collect::<Vec<_>>().join(" "))
                .collect();
            let batched = classifier.logits(&texts).unwrap();
            for (i, text) in texts.iter().enumerate() {
                let alone = classifier.logits(std::slice::from_ref(text)).unwrap();
                let row = batched.narrow(0, i, 1).unwrap();
                let diff = testkit::max_abs_diff(&row, &alone).unwrap();
                prop_assert!(diff <= 1e-5, "row {i} ({} words): {diff}", lengths[i]);
            }
        }
    }
}
