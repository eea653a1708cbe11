//! A quantized frozen base (QLoRA-style): a product through a quantized weight computes what
//! the dequantized weight computes, its input gradient matches central differences on the
//! dequantized weight, and on a whole decoder with a q8_0 base the gradients of low-rank
//! factors at every site match central differences on the dequantized model.
use candle_core::{DType, Device, Tensor, Var};
use graft_model::decoder::{Decoder, DecoderInputs};
use graft_model::loss::causal_lm_loss;
use graft_model::quant::{Quantization, QuantizedWeight};
use graft_model::{init, ops, Hooks, LinearSite, LowRank};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn stories260k() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K")
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
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

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

/// Sets element `index` of the flattened `var` to `value`.
fn set_entry(var: &Var, index: usize, value: f64) {
    let mut values = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    values[index] = value;
    var.set(
        &Tensor::from_vec(values, var.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap(),
    )
    .unwrap();
}

fn entry(var: &Var, index: usize) -> f64 {
    var.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[index]
}

/// Each family on a width its blocks divide (q8_0 on 64, q4_k on 256, q4_k falling back to
/// q5_0 on 96): the quantized product equals the product with the dequantized weight (f64
/// activations, to rounding), the quantization error is real but small, and the input
/// gradient through the fused backward matches central differences of the dequantized
/// product.
#[test]
fn quantized_product_and_input_gradient_match_the_dequantized_weight() {
    let mut rng = init::seeded_rng(17);
    for (family, width, format, max_error) in [
        (Quantization::Q8_0, 64, "q8_0", 0.01),
        (Quantization::Q4K, 256, "q4_k", 0.15),
        (Quantization::Q4K, 96, "q5_0", 0.08),
    ] {
        let out = 40;
        let weight = init::normal(&mut rng, &[out, width], 0.5, DType::F32, &Device::Cpu).unwrap();
        let q = QuantizedWeight::quantize(&weight, family, DType::F64, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(graft_model::quant::format_name(q.format()), format);
        let dense = q.dequantize().unwrap();
        assert_eq!(dense.dtype(), DType::F64);
        let error =
            max_abs(&(weight.to_dtype(DType::F64).unwrap() - &dense).unwrap()) / max_abs(&weight);
        assert!(
            error > 0.0 && error < max_error,
            "{format}: quantization error {error} of the largest weight"
        );

        let x = Var::from_tensor(
            &init::normal(&mut rng, &[2, 3, width], 1.0, DType::F64, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let probe = init::normal(&mut rng, &[2, 3, out], 1.0, DType::F64, &Device::Cpu).unwrap();
        let y = ops::quantized_linear(x.as_tensor(), &q).unwrap();
        let expected = ops::linear(x.as_tensor(), &dense, None).unwrap();
        let diff = max_abs(&(&y - &expected).unwrap());
        assert!(
            diff <= 1e-12 * max_abs(&expected),
            "{format}: product differs by {diff}"
        );

        let loss = |x: &Tensor| -> f64 {
            scalar(
                &(ops::linear(x, &dense, None).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap(),
            )
        };
        let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let grad: Vec<f64> = grads
            .get(x.as_tensor())
            .expect("the input gets a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let h = 1e-5;
        for index in [0, 7, width + 3, 6 * width - 1] {
            let at = entry(&x, index);
            set_entry(&x, index, at + h);
            let up = loss(x.as_tensor());
            set_entry(&x, index, at - h);
            let down = loss(x.as_tensor());
            set_entry(&x, index, at);
            let numeric = (up - down) / (2.0 * h);
            assert!(
                (grad[index] - numeric).abs() <= 1e-7 * numeric.abs().max(1.0),
                "{format}: input gradient [{index}] {} against central difference {numeric}",
                grad[index]
            );
        }
    }
}

/// In f32 and bf16 activations the fused product stays within their rounding of the f64 one.
#[test]
fn quantized_product_in_f32_and_bf16() {
    let mut rng = init::seeded_rng(3);
    let weight = init::normal(&mut rng, &[96, 256], 0.5, DType::F32, &Device::Cpu).unwrap();
    let x = init::normal(&mut rng, &[4, 256], 1.0, DType::F64, &Device::Cpu).unwrap();
    let wide = {
        let q = QuantizedWeight::quantize(&weight, Quantization::Q4K, DType::F64, &Device::Cpu)
            .unwrap()
            .unwrap();
        ops::quantized_linear(&x, &q).unwrap()
    };
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 0.02)] {
        let q = QuantizedWeight::quantize(&weight, Quantization::Q4K, dtype, &Device::Cpu)
            .unwrap()
            .unwrap();
        let y = ops::quantized_linear(&x.to_dtype(dtype).unwrap(), &q).unwrap();
        assert_eq!(y.dtype(), dtype);
        let relative =
            max_abs(&(y.to_dtype(DType::F64).unwrap() - &wide).unwrap()) / max_abs(&wide);
        assert!(relative <= tolerance, "{dtype:?}: {relative}");
    }
}

/// A low-rank update `x · Aᵀ · Bᵀ` at every linear site, both factors random and trainable.
struct Factors {
    sites: BTreeMap<String, (Var, Var)>,
}

impl Factors {
    fn new(model: &Decoder, rank: usize, seed: u64) -> Self {
        let mut rng = init::seeded_rng(seed);
        let sites = model
            .sites()
            .into_iter()
            .map(|s| {
                let mut var = |shape: &[usize]| {
                    Var::from_tensor(
                        &init::normal(&mut rng, shape, 0.1, DType::F64, &Device::Cpu).unwrap(),
                    )
                    .unwrap()
                };
                let a = var(&[rank, s.in_features]);
                let b = var(&[s.out_features, rank]);
                (s.name, (a, b))
            })
            .collect();
        Self { sites }
    }
}

impl Hooks for Factors {
    fn low_rank(&self, site: &LinearSite<'_>, x: &Tensor) -> candle_core::Result<Option<LowRank>> {
        Ok(self.sites.get(site.name).map(|(a, b)| LowRank {
            a: a.as_tensor().to_dtype(x.dtype()).unwrap(),
            b: b.as_tensor().to_dtype(x.dtype()).unwrap(),
            input_mask: None,
        }))
    }
}

fn story_loss(model: &Decoder, hooks: &dyn Hooks) -> Tensor {
    let ids: [u32; 10] = [1, 403, 407, 261, 378, 275, 261, 499, 305, 283];
    let inputs = DecoderInputs {
        input_ids: Tensor::new(&ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        attention_mask: None,
    };
    let labels: Vec<i64> = ids[1..]
        .iter()
        .map(|&i| i64::from(i))
        .chain([-100])
        .collect();
    let hidden = model.forward(&inputs, hooks, None).unwrap();
    causal_lm_loss(&model.lm_head(&hidden, hooks).unwrap(), &labels).unwrap()
}

/// stories260K with a q8_0 base (every projection but `down_proj`, whose 172-wide rows no
/// block of 32 divides): the same loss as the dense model holding the dequantized weights,
/// and the gradients of low-rank factors at every site (so through every quantized layer's
/// input gradient below them) match central differences of the dequantized model's loss.
#[test]
fn low_rank_gradients_on_a_q8_0_base_match_finite_differences_of_the_dequantized_model() {
    let dir = stories260k();
    let quantized =
        Decoder::open_quantized(&dir, DType::F64, Some(Quantization::Q8_0), &Device::Cpu).unwrap();
    let keys: Vec<String> = quantized
        .quantized()
        .iter()
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(
        keys.len(),
        5 * 6,
        "q, k, v, o, gate and up of 5 layers: {keys:?}"
    );
    assert!(keys.iter().all(|k| !k.contains("down_proj")));
    let mut dequantized = Decoder::open(&dir, DType::F64, &Device::Cpu).unwrap();
    for (key, blocks) in quantized.quantized() {
        let site = key.strip_suffix(".weight").unwrap();
        dequantized
            .linear_mut(site)
            .unwrap()
            .set_weight(blocks.dequantize().unwrap())
            .unwrap();
    }
    let factors = Factors::new(&quantized, 2, 5);
    let loss = story_loss(&quantized, &factors);
    let dense_loss = scalar(&story_loss(&dequantized, &factors));
    assert!(
        (scalar(&loss) - dense_loss).abs() <= 1e-10 * dense_loss.abs(),
        "quantized loss {} against the dequantized model's {dense_loss}",
        scalar(&loss)
    );
    let grads = loss.backward().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    // The first, a middle and the last layer's sites, both factors, two entries each.
    for (site, (a, b)) in factors.sites.iter().filter(|(s, _)| {
        s.contains("layers.0.") || s.contains("layers.2.") || s.contains("layers.4.")
    }) {
        for (factor, var) in [("A", a), ("B", b)] {
            let grad: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{site}.{factor} gets no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for index in [1, var.elem_count() - 2] {
                let at = entry(var, index);
                set_entry(var, index, at + h);
                let up = scalar(&story_loss(&dequantized, &factors));
                set_entry(var, index, at - h);
                let down = scalar(&story_loss(&dequantized, &factors));
                set_entry(var, index, at);
                let numeric = (up - down) / (2.0 * h);
                assert!(
                    (grad[index] - numeric).abs() <= 1e-6 * numeric.abs().max(1e-3),
                    "{site}.{factor}[{index}]: autograd {} against central difference {numeric}",
                    grad[index]
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 7 * 2 * 2);
}

/// A quantized weight cannot be merged into, trained or saved in a full model: each says so.
#[test]
fn a_quantized_weight_refuses_merging_and_saving() {
    let dir = stories260k();
    let mut model =
        Decoder::open_quantized(&dir, DType::F32, Some(Quantization::Q8_0), &Device::Cpu).unwrap();
    let site = "model.layers.0.self_attn.q_proj";
    let linear = model.linear_mut(site).unwrap();
    let err = linear.weight().err().unwrap().to_string();
    assert!(
        err.contains("kept quantized (q8_0)") && err.contains("merged into"),
        "{err}"
    );
    let err = linear
        .set_weight(Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(site), "{err}");
    let out = tempfile::tempdir().unwrap();
    let err = model
        .save(out.path(), &graft_model::NoHooks)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("saved in a full model"), "{err}");
    assert!(!out.path().join("model.safetensors").exists());
}

/// The fused low-rank update over a quantized weight (with a bias, and with a dropout mask)
/// gives the composition's values and gradients for the input and both factors (f64).
#[test]
fn fused_low_rank_update_on_a_quantized_weight_matches_the_composition() {
    let mut rng = init::seeded_rng(23);
    let mut normal =
        |shape: &[usize]| init::normal(&mut rng, shape, 0.5, DType::F64, &Device::Cpu).unwrap();
    let weight = normal(&[48, 256]).to_dtype(DType::F32).unwrap();
    let q = QuantizedWeight::quantize(&weight, Quantization::Q4K, DType::F64, &Device::Cpu)
        .unwrap()
        .unwrap();
    let bias = normal(&[48]);
    let probe = normal(&[2, 3, 48]);
    let x = Var::from_tensor(&normal(&[2, 3, 256])).unwrap();
    let a = Var::from_tensor(&normal(&[4, 256])).unwrap();
    let b = Var::from_tensor(&normal(&[48, 4])).unwrap();
    let keep = normal(&[2, 3, 256])
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    for mask in [None, Some((keep * 2.0).unwrap())] {
        let update = LowRank {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            input_mask: mask.clone(),
        };
        let run = |y: Tensor| {
            let grads = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (y, [grad(&x), grad(&a), grad(&b)])
        };
        let (fused, fused_grads) =
            run(ops::quantized_linear_low_rank(x.as_tensor(), &q, Some(&bias), &update).unwrap());
        let composed = (ops::quantized_linear(x.as_tensor(), &q)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            + ops::low_rank_delta(x.as_tensor(), &update).unwrap())
        .unwrap();
        let (composed, composed_grads) = run(composed);
        let diff = max_abs(&(&fused - &composed).unwrap());
        assert!(
            diff <= 1e-12 * max_abs(&composed),
            "values differ by {diff}"
        );
        for (what, f, c) in [
            ("x", &fused_grads[0], &composed_grads[0]),
            ("A", &fused_grads[1], &composed_grads[1]),
            ("B", &fused_grads[2], &composed_grads[2]),
        ] {
            let diff = max_abs(&(f - c).unwrap());
            assert!(
                diff <= 1e-12 * max_abs(c),
                "mask {}: d{what} differs by {diff}",
                mask.is_some()
            );
        }
    }
}
