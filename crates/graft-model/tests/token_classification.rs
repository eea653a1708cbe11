//! Token classification (`Pooling::Tokens`): transformers' BertForTokenClassification and
//! LlamaForTokenClassification heads on every token, a prompt's virtual tokens left unlabelled,
//! gradients against central differences through the head and into the model, and a saved
//! model that reads back to the same logits.
mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::max_abs_diff;
use graft_model::classify::{self, SequenceClassifier};
use graft_model::hooks::Hooks;
use graft_model::models::bert::{Inputs, Pooling};
use graft_model::NoHooks;
use std::path::PathBuf;

const LABELS: usize = 3;

/// A prompt of virtual tokens, as prompt tuning prepends them.
struct Prompt(Var);

impl Hooks for Prompt {
    fn prompt(&self, batch: usize) -> candle_core::Result<Option<Tensor>> {
        let (n, h) = self.0.dims2()?;
        Ok(Some(
            self.0.as_tensor().unsqueeze(0)?.expand((batch, n, h))?,
        ))
    }
}

fn minilm() -> PathBuf {
    graft_model::zoo::MINILM
        .ensure(&mut |m| eprintln!("{m}"))
        .unwrap()
}

fn stories() -> PathBuf {
    common::shared_model("stories260K")
}

/// Two rows of 6 tokens, the second padded after 4.
fn inputs() -> Inputs {
    // Ids within stories260K's 512 tokens, so that both models read them.
    let ids = Tensor::new(
        &[[1u32, 23, 45, 67, 89, 2], [1, 120, 300, 2, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    Inputs {
        input_ids: ids,
        attention_mask: mask,
        token_type_ids: None,
    }
}

fn load(dir: &std::path::Path, seed: u64) -> Box<dyn SequenceClassifier> {
    classify::load(dir, LABELS, Pooling::Tokens, DType::F64, &Device::Cpu, seed).unwrap()
}

/// The head's own arithmetic on hidden states `[b, t, h]`: `x·Wᵀ + b`.
fn by_hand(model: &dyn SequenceClassifier, hidden: &Tensor) -> Tensor {
    let vars = model.head().vars();
    let weight = vars[0].1.as_tensor();
    let out = hidden.broadcast_matmul(&weight.t().unwrap()).unwrap();
    match vars.get(1) {
        Some((_, bias)) => out.broadcast_add(bias.as_tensor()).unwrap(),
        None => out,
    }
}

#[test]
fn every_token_gets_logits_from_the_head_with_its_bias() {
    let inputs = inputs();
    let bert = load(&minilm(), 1);
    let logits = bert.forward(&inputs, &NoHooks).unwrap();
    assert_eq!(logits.dims(), [2, 6, LABELS]);
    let (hidden, _) = bert.bert().unwrap().forward(&inputs, &NoHooks).unwrap();
    assert!(max_abs_diff(&logits, &by_hand(bert.as_ref(), &hidden)) < 1e-12);

    let decoder = load(&stories(), 1);
    let names: Vec<String> = decoder.head().vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["weight", "bias"],
        "LlamaForTokenClassification's score has a bias"
    );
    let logits = decoder.forward(&inputs, &NoHooks).unwrap();
    assert_eq!(logits.dims(), [2, 6, LABELS]);
    // A causal decoder: a token's logits do not depend on what follows it.
    let first_four = Inputs {
        input_ids: inputs.input_ids.narrow(1, 0, 4).unwrap(),
        attention_mask: inputs.attention_mask.narrow(1, 0, 4).unwrap(),
        token_type_ids: None,
    };
    let shorter = decoder.forward(&first_four, &NoHooks).unwrap();
    assert!(max_abs_diff(&logits.narrow(1, 0, 4).unwrap(), &shorter) < 1e-10);
}

/// A prompt's virtual tokens change the input tokens' logits but get none of their own.
#[test]
fn virtual_tokens_take_no_label() {
    let inputs = inputs();
    for dir in [minilm(), stories()] {
        let model = load(&dir, 2);
        let h = model.info().hidden_size;
        let prompt = Prompt(
            Var::from_tensor(&(Tensor::randn(0f64, 0.5, (3, h), &Device::Cpu).unwrap())).unwrap(),
        );
        let plain = model.forward(&inputs, &NoHooks).unwrap();
        let prompted = model.forward(&inputs, &prompt).unwrap();
        assert_eq!(prompted.dims(), [2, 6, LABELS], "{}", dir.display());
        assert!(max_abs_diff(&plain, &prompted) > 1e-4, "{}", dir.display());
        // BERT's encoder returns the virtual tokens' states first: the logits are the rest's.
        if let Some(bert) = model.bert() {
            let (hidden, _) = bert.forward(&inputs, &prompt).unwrap();
            assert_eq!(hidden.dim(1).unwrap(), 3 + 6);
            let real = hidden.narrow(1, 3, 6).unwrap();
            assert!(max_abs_diff(&prompted, &by_hand(model.as_ref(), &real)) < 1e-12);
        }
    }
}

/// Mean cross-entropy over the labelled tokens (the padding and the first token unlabelled):
/// autograd against central differences for the head's weight and bias and for a prompt's
/// virtual tokens, whose gradient reaches them only through the model's attention.
#[test]
fn gradients_match_central_differences() {
    let inputs = inputs();
    let labels: Vec<i64> = vec![-100, 0, 1, 2, 1, 0, -100, 2, 0, 1, -100, -100];
    for dir in [minilm(), stories()] {
        let model = load(&dir, 3);
        let h = model.info().hidden_size;
        let prompt = Prompt(
            Var::from_tensor(&Tensor::randn(0f64, 0.5, (2, h), &Device::Cpu).unwrap()).unwrap(),
        );
        let loss = || {
            let logits = model.forward(&inputs, &prompt).unwrap();
            graft_model::loss::causal_lm_loss(&logits, &labels).unwrap()
        };
        let grads = loss().backward().unwrap();
        let mut tensors = model.head().vars();
        tensors.push(("prompt".into(), prompt.0.clone()));
        for (name, var) in &tensors {
            let grad = grads.get(var.as_tensor()).expect(name);
            let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            assert!(grad.iter().any(|g| *g != 0.0), "{name}: no gradient");
            let count = grad.len();
            for index in [0, count / 3, count - 1] {
                let at = |delta: f64| {
                    let flat = var.as_tensor().flatten_all().unwrap();
                    let mut values: Vec<f64> = flat.to_vec1().unwrap();
                    values[index] += delta;
                    let moved = Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap();
                    let original = var.as_tensor().copy().unwrap();
                    var.set(&moved).unwrap();
                    let value = loss().to_scalar::<f64>().unwrap();
                    var.set(&original).unwrap();
                    value
                };
                let eps = 1e-5;
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                let scale = numeric.abs().max(grad[index].abs()).max(1e-8);
                assert!(
                    (numeric - grad[index]).abs() / scale < 1e-5,
                    "{} {name}[{index}]: autograd {} numeric {numeric}",
                    dir.display(),
                    grad[index]
                );
            }
        }
    }
}

/// A saved token classifier is transformers' `*ForTokenClassification` folder, and reads back,
/// head and all, to the same logits.
#[test]
fn a_saved_token_classifier_reads_back_to_the_same_logits() {
    let inputs = inputs();
    for (dir, architecture) in [
        (minilm(), "BertForTokenClassification"),
        (stories(), "LlamaForTokenClassification"),
    ] {
        let model = load(&dir, 4);
        // A trained head: not the one a fresh load draws.
        for (_, var) in model.head().vars() {
            let moved = (var.as_tensor() + 0.01).unwrap();
            var.set(&moved).unwrap();
        }
        let out = tempfile::tempdir().unwrap();
        model.save(out.path(), LABELS, &NoHooks).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["architectures"][0], architecture);
        let back = load(out.path(), 99);
        let a = model.forward(&inputs, &NoHooks).unwrap();
        let b = back.forward(&inputs, &NoHooks).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-12, "{architecture}");
        assert_eq!(
            b.argmax(D::Minus1).unwrap().to_vec2::<u32>().unwrap(),
            a.argmax(D::Minus1).unwrap().to_vec2::<u32>().unwrap()
        );
    }
}
