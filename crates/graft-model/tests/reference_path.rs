//! The composed ops (`ops/reference.rs`), which a CUDA build runs, forced here with
//! `GRAFT_REFERENCE_OPS=1` (this test binary sets it before any op runs): stories260K matches
//! candle-transformers' llama in f32, and in f16 (candle multiplies f16 on the CPU, not bf16)
//! it stays close to f32, with f32 trainable tensors meeting f16 activations and receiving f32
//! gradients, as mixed precision on a GPU does.
use candle_core::{DType, Device, Tensor, Var};
use graft_model::decoder::{Decoder, DecoderInputs};
use graft_model::{ops, LowRank, NoHooks};
use std::path::{Path, PathBuf};

fn force_reference_ops() {
    std::env::set_var("GRAFT_REFERENCE_OPS", "1");
    assert!(
        ops::reference_forced(),
        "an op ran before GRAFT_REFERENCE_OPS was set: this binary tests the fused kernels"
    );
}

fn stories260k() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K")
}

fn logits(model: &Decoder, ids: &[u32]) -> Tensor {
    let inputs = DecoderInputs {
        input_ids: Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        attention_mask: Some(Tensor::ones((1, ids.len()), DType::U32, &Device::Cpu).unwrap()),
    };
    let hidden = model.forward(&inputs, &NoHooks, None).unwrap();
    model.lm_head(&hidden, &NoHooks).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The gradient of `sum(y ⊙ upstream)` with respect to `x`.
fn input_grad(x: &Var, y: &Tensor, upstream: &Tensor) -> Tensor {
    let grads = (y * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    grads.get(x.as_tensor()).unwrap().clone()
}

const IDS: [u32; 10] = [1, 403, 407, 261, 378, 275, 261, 499, 305, 283];

#[test]
fn composed_ops_match_candle_transformers_and_hold_in_f16() {
    force_reference_ops();
    let dir = stories260k();
    let ours = Decoder::open(&dir, DType::F32, &Device::Cpu).unwrap();
    let wide = logits(&ours, &IDS);

    // candle-transformers' llama, last position.
    let config: candle_transformers::models::llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config = config.into_config(false);
    // SAFETY: ../shared is read-only and not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let llama = candle_transformers::models::llama::Llama::load(vb, &config).unwrap();
    let mut cache =
        candle_transformers::models::llama::Cache::new(false, DType::F32, &config, &Device::Cpu)
            .unwrap();
    let ids = Tensor::new(&IDS, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let expected = llama.forward(&ids, 0, &mut cache).unwrap();
    let last = wide
        .narrow(1, IDS.len() - 1, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let diff = max_abs(&(last - expected).unwrap());
    assert!(
        diff <= 1e-4,
        "composed f32 logits differ from candle-transformers' by {diff}"
    );

    // f16 storage, f32 norms, softmax and scores.
    let half = Decoder::open(&dir, DType::F16, &Device::Cpu).unwrap();
    let narrow = logits(&half, &IDS);
    assert_eq!(narrow.dtype(), DType::F16);
    let relative =
        max_abs(&(narrow.to_dtype(DType::F32).unwrap() - &wide).unwrap()) / max_abs(&wide);
    eprintln!("composed f16 logits within {relative} of the largest f32 logit");
    assert!(
        relative <= 0.01,
        "composed f16 logits differ by {relative} of the largest"
    );
}

/// A low-rank update with f32 factors on f16 activations, composed: the output is f16 and
/// equals the f32 computation within f16 rounding; the factors' gradients are f32 and equal
/// the f32 ones within f16 rounding of the activations they come through.
#[test]
fn composed_low_rank_update_mixes_f32_factors_with_f16_activations() {
    force_reference_ops();
    let mut rng = graft_model::init::seeded_rng(3);
    let mut normal = |shape: &[usize]| {
        graft_model::init::normal(&mut rng, shape, 0.5, DType::F32, &Device::Cpu).unwrap()
    };
    let x = normal(&[2, 5, 32]);
    let weight = normal(&[24, 32]);
    let (a, b) = (
        Var::from_tensor(&normal(&[4, 32])).unwrap(),
        Var::from_tensor(&normal(&[24, 4])).unwrap(),
    );
    let run = |dtype: DType| {
        let update = LowRank {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            input_mask: None,
        };
        let y = ops::linear_low_rank(
            &x.to_dtype(dtype).unwrap(),
            &weight.to_dtype(dtype).unwrap(),
            None,
            &update,
        )
        .unwrap();
        assert_eq!(y.dtype(), dtype);
        let grads = y
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ga = grads.get(a.as_tensor()).unwrap().clone();
        let gb = grads.get(b.as_tensor()).unwrap().clone();
        (y.to_dtype(DType::F32).unwrap(), ga, gb)
    };
    let (y32, ga32, gb32) = run(DType::F32);
    let (y16, ga16, gb16) = run(DType::F16);
    assert_eq!(
        (ga16.dtype(), gb16.dtype()),
        (DType::F32, DType::F32),
        "f32 gradients"
    );
    for (what, narrow, wide) in [
        ("output", &y16, &y32),
        ("dA", &ga16, &ga32),
        ("dB", &gb16, &gb32),
    ] {
        let relative = max_abs(&(narrow - wide).unwrap()) / max_abs(wide);
        assert!(
            relative <= 0.01,
            "{what} in f16 differs by {relative} of the largest"
        );
    }
}

/// The composed path a CUDA build runs for a quantized base multiplies by the dequantized
/// weight forward and backward alike. On stories260K with a q8_0 base, in f64: one product's
/// input gradient equals an independent dense product `dy · W` of the dequantized weight; the
/// logits and every low-rank factor's gradient equal those of the dense model holding the
/// dequantized weights (to 1e-10 of the largest: only the order of additions may differ); and
/// sampled factor gradients agree with central differences of the quantized model itself, to
/// the 1e-3 relative error the method checks allow on the CPU's fused kernel.
#[test]
fn composed_quantized_base_differentiates_the_dequantized_model() {
    use graft_model::quant::Quantization;
    use graft_model::{Hooks, LinearSite};
    force_reference_ops();
    let dir = stories260k();
    let quantized =
        Decoder::open_quantized(&dir, DType::F64, Some(Quantization::Q8_0), &Device::Cpu).unwrap();
    let mut dense = Decoder::open(&dir, DType::F64, &Device::Cpu).unwrap();
    for (key, blocks) in quantized.quantized() {
        dense
            .linear_mut(key.strip_suffix(".weight").unwrap())
            .unwrap()
            .set_weight(blocks.dequantize().unwrap())
            .unwrap();
    }
    struct Factors(Vec<(String, Var, Var)>);
    impl Hooks for Factors {
        fn low_rank(
            &self,
            site: &LinearSite<'_>,
            _x: &Tensor,
        ) -> candle_core::Result<Option<LowRank>> {
            Ok(self
                .0
                .iter()
                .find(|(n, _, _)| n == site.name)
                .map(|(_, a, b)| LowRank {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    input_mask: None,
                }))
        }
    }
    let mut rng = graft_model::init::seeded_rng(9);
    let factors = Factors(
        quantized
            .sites()
            .into_iter()
            .map(|s| {
                let mut var = |shape: &[usize]| {
                    Var::from_tensor(
                        &graft_model::init::normal(&mut rng, shape, 0.1, DType::F64, &Device::Cpu)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (a, b) = (var(&[2, s.in_features]), var(&[s.out_features, 2]));
                (s.name, a, b)
            })
            .collect(),
    );
    let loss_and_logits = |model: &Decoder| {
        let inputs = DecoderInputs {
            input_ids: Tensor::new(&IDS, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            attention_mask: None,
        };
        let hidden = model.forward(&inputs, &factors, None).unwrap();
        let logits = model.lm_head(&hidden, &factors).unwrap();
        (logits.sqr().unwrap().mean_all().unwrap(), logits)
    };
    let run = |model: &Decoder| {
        let (loss, logits) = loss_and_logits(model);
        let grads = loss.backward().unwrap();
        let grads: Vec<Tensor> = factors
            .0
            .iter()
            .flat_map(|(_, a, b)| [a, b])
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .expect("every factor gets a gradient")
                    .clone()
            })
            .collect();
        (logits, grads)
    };
    // One product's input gradient against `dy · W` computed apart, by candle's matmul.
    let (key, blocks) = quantized.quantized()[0];
    let x = Var::from_tensor(
        &graft_model::init::normal(
            &mut rng,
            &[1, 3, blocks.dims().1],
            1.0,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap();
    let through_blocks = ops::quantized_linear(x.as_tensor(), blocks).unwrap();
    let upstream = through_blocks.detach();
    let g_quantized = input_grad(&x, &through_blocks, &upstream);
    let weight = blocks.dequantize().unwrap().to_dtype(DType::F64).unwrap();
    let g_dense = upstream
        .squeeze(0)
        .unwrap()
        .matmul(&weight)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let diff = max_abs(&(&g_quantized - &g_dense).unwrap()) / max_abs(&g_dense);
    assert!(diff <= 1e-12, "{key}: input gradient differs by {diff}");

    let (logits, grads) = run(&quantized);
    let (expected, expected_grads) = run(&dense);
    let relative = max_abs(&(&logits - &expected).unwrap()) / max_abs(&expected);
    assert!(
        relative <= 1e-10,
        "logits differ from the dequantized model's by {relative} of the largest"
    );
    for (i, (g, e)) in grads.iter().zip(&expected_grads).enumerate() {
        let diff = max_abs(&(g - e).unwrap()) / max_abs(e).max(1e-300);
        assert!(
            diff <= 1e-10,
            "factor gradient {i} differs from the dequantized model's by {diff} of its largest"
        );
    }
    // Central differences of the quantized model's loss: two entries of A and of B at the
    // first, a middle and the last site.
    let h = 1e-5;
    let n = factors.0.len();
    let mut largest = 0f64;
    for site in [0, n / 2, n - 1] {
        for (which, var) in [(0, &factors.0[site].1), (1, &factors.0[site].2)] {
            let analytic: Vec<f64> = grads[2 * site + which]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for index in [0, base.len() / 2 + 1] {
                let loss_at = |delta: f64| {
                    let mut moved = base.clone();
                    moved[index] += delta;
                    var.set(&Tensor::from_vec(moved, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    let loss = ops::without_grad(|| loss_and_logits(&quantized).0);
                    loss.to_scalar::<f64>().unwrap()
                };
                let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let error = (numeric - analytic[index]).abs() / numeric.abs().max(1e-6);
                assert!(
                    error <= 1e-3,
                    "site {site} factor {which} [{index}]: backward {}, central differences {numeric}",
                    analytic[index]
                );
                largest = largest.max(numeric.abs());
            }
        }
    }
    assert!(
        largest > 1e-6,
        "every sampled gradient is ~0: the check proves nothing"
    );
}

/// A frozen weight takes its own path (the product on a detached input, then a node that only
/// passes the input gradient back); a trained one goes through candle's autograd. Reloading a
/// fully fine-tuned model turns the second into the first: outputs must be bit-identical and
/// input gradients equal.
#[test]
fn a_frozen_and_a_trained_weight_give_bit_identical_outputs_and_equal_input_gradients() {
    force_reference_ops();
    let seeded = |shape: &[usize], seed: u64| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n as u64)
            .map(|i| (((i + 1) * (seed * 7919 + 13)) % 997) as f32 / 997.0 - 0.5)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    };
    let (w, b) = (seeded(&[24, 16], 2), seeded(&[24], 3));
    let x = Var::from_tensor(&seeded(&[3, 7, 16], 1)).unwrap();
    let frozen = ops::linear(x.as_tensor(), &w, Some(&b)).unwrap();
    let trained_w = Var::from_tensor(&w).unwrap();
    let trained = ops::linear(x.as_tensor(), trained_w.as_tensor(), Some(&b)).unwrap();
    assert_eq!(max_abs(&(&frozen - &trained).unwrap()), 0.0);

    let upstream = seeded(&[3, 7, 24], 4);
    let frozen_grad = input_grad(&x, &frozen, &upstream);
    let trained_grad = input_grad(&x, &trained, &upstream);
    let gap = max_abs(&(&frozen_grad - &trained_grad).unwrap());
    assert!(
        gap <= 1e-6 * max_abs(&trained_grad),
        "input gradients differ by {gap}"
    );
}

/// Dropout as a CUDA build draws it (the reference path's): the mask is
/// `counter_keep`'s from the generator's position, in the activations' dtype with entries 0
/// and 1 / (1 - p), and a rewind replays it.
#[test]
fn dropout_masks_are_made_on_the_device_and_replay() {
    use graft_model::init::{counter_keep, seeded_rng, Dropout};
    force_reference_ops();
    let (p, seed, shape) = (0.25, 17, [3, 5, 40]);
    let dropout = Dropout::new(p, seed);
    dropout.set_training(true);
    for dtype in [DType::BF16, DType::F16, DType::F32, DType::F64] {
        let at = dropout.position().unwrap();
        let mask = dropout.mask(&shape, dtype, &Device::Cpu).unwrap().unwrap();
        assert_eq!((mask.dtype(), mask.dims()), (dtype, &shape[..]));
        let mut rng = seeded_rng(seed);
        rng.set_word_pos(at);
        let keep = counter_keep(&mut rng, p, &shape, &Device::Cpu).unwrap();
        let expected = (keep.to_dtype(dtype).unwrap() / (1.0 - p)).unwrap();
        dropout.rewind(at).unwrap();
        let again = dropout.mask(&shape, dtype, &Device::Cpu).unwrap().unwrap();
        for other in [expected, again] {
            assert_eq!(max_abs(&(&mask - other).unwrap()), 0.0, "{dtype:?}");
        }
        let scale = Tensor::new(1.0 / (1.0 - p), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let values = mask
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(values.iter().all(|&v| v == 0.0 || v == scale));
        assert!(values.contains(&0.0) && values.contains(&scale));
    }
}
