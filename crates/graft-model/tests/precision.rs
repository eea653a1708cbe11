//! Half precision: a bf16 (or f16) base computes what the f32 one does, within the rounding of
//! its storage, on SmolLM2 and on a random ChatGLM; the kernels' half-precision paths (weights
//! widened block by block, norms in f32) give the f32 values of the same stored numbers.
mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::all_logits;
use graft_model::decoder::Decoder;
use graft_model::loss::causal_lm_loss;
use graft_model::ops;
use std::path::Path;

fn mean_nll(logits: &Tensor, ids: &[u32]) -> f32 {
    let labels: Vec<i64> = ids[1..]
        .iter()
        .map(|&i| i64::from(i))
        .chain([-100])
        .collect();
    causal_lm_loss(logits, &labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `(max |a - b| / max |b|, share of positions whose top token agrees)` over `[1, t, vocab]`.
fn compare(narrow: &Tensor, wide: &Tensor) -> (f32, f32) {
    let narrow = narrow.to_dtype(DType::F32).unwrap();
    let scale = wide.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let diff = (&narrow - wide)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let relative = diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
    let top = |t: &Tensor| {
        t.argmax(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    };
    let (a, b) = (top(&narrow), top(wide));
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f32 / a.len() as f32;
    (relative, agree)
}

/// SmolLM2 in bf16 and in f16 against f32, on the sentence of ../shared/models/README.md.
/// Measured: bf16 logits within 0.032 of the largest, NLL 2.504 against f32's 2.485, the top
/// token agreeing at every position; f16 within 0.004, NLL 2.4845.
#[test]
fn smollm2_half_precision_is_close_to_f32() {
    let dir = graft_model::zoo::SMOLLM2
        .ensure(&mut |m| eprintln!("{m}"))
        .expect("SmolLM2 (run `cargo xtask fetch-model smollm2`)");
    let path = dir.join(graft_model::zoo::SMOLLM2_GGUF);
    let tokenizer = tokenizers::Tokenizer::from_file(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/models/smollm2-135m-instruct/tokenizer.json"),
    )
    .unwrap();
    let ids = tokenizer
        .encode("The capital of France is Paris. It is known for", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let wide = all_logits(
        &Decoder::open(&path, DType::F32, &Device::Cpu).unwrap(),
        &ids,
    );
    let nll = mean_nll(&wide, &ids);
    for (dtype, tolerance, nll_tolerance) in [(DType::BF16, 0.06, 0.05), (DType::F16, 0.01, 0.01)] {
        let model = Decoder::open(&path, dtype, &Device::Cpu).unwrap();
        assert_eq!(model.dtype(), dtype);
        let narrow = all_logits(&model, &ids);
        assert_eq!(
            narrow.dtype(),
            dtype,
            "logits stay in the activations' dtype"
        );
        let (relative, agree) = compare(&narrow, &wide);
        let narrow_nll = mean_nll(&narrow, &ids);
        eprintln!(
            "{dtype:?}: logits within {relative} of the largest, NLL {narrow_nll} (f32 {nll}), top token agreeing at {agree}"
        );
        assert!(
            relative <= tolerance,
            "{dtype:?} logits differ by {relative} of the largest"
        );
        assert!(
            (narrow_nll - nll).abs() <= nll_tolerance,
            "{dtype:?} NLL {narrow_nll}, f32 {nll}"
        );
        assert!(
            agree >= 0.8,
            "{dtype:?}: top tokens agree at only {agree} of positions"
        );
    }
}

/// A random ChatGLM (two query groups, half-rotated heads, q/k/v biases) in bf16 against f32.
#[test]
fn random_chatglm_in_bf16_is_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let config = graft_model::models::chatglm::Config::tiny(70);
    graft_model::models::chatglm::write_random(dir.path(), &config, 11).unwrap();
    let ids: Vec<u32> = vec![3, 17, 42, 5, 69, 0, 11, 23, 8];
    let wide = all_logits(
        &Decoder::open(dir.path(), DType::F32, &Device::Cpu).unwrap(),
        &ids,
    );
    let narrow = all_logits(
        &Decoder::open(dir.path(), DType::BF16, &Device::Cpu).unwrap(),
        &ids,
    );
    let (relative, agree) = compare(&narrow, &wide);
    eprintln!("ChatGLM bf16: within {relative} of the largest logit, top agreeing at {agree}");
    assert!(
        relative <= 0.06,
        "bf16 logits differ by {relative} of the largest"
    );
    assert!(
        agree >= 0.8,
        "top tokens agree at only {agree} of positions"
    );
}

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = graft_model::init::seeded_rng(seed);
    graft_model::init::normal(&mut rng, shape, 1.0, DType::F32, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
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

/// A bf16 weight larger than one widening block (the tied-head case) gives the product, the
/// bias and the input gradient of its values in f32; mixed bf16 input and f32 weight too.
#[test]
fn half_precision_weight_is_widened_block_by_block_exactly() {
    let (out, width, rows) = (5000, 600, 6); // 3495 rows a block: two blocks
    let w16 = random(&[out, width], 1, DType::BF16);
    let w32 = w16.to_dtype(DType::F32).unwrap();
    let bias16 = random(&[out], 2, DType::BF16);
    let bias32 = bias16.to_dtype(DType::F32).unwrap();
    let x = Var::from_tensor(&random(&[1, rows, width], 3, DType::F32)).unwrap();
    let y16 = ops::linear(x.as_tensor(), &w16, Some(&bias16)).unwrap();
    let y32 = ops::linear(x.as_tensor(), &w32, Some(&bias32)).unwrap();
    assert_eq!(y16.dtype(), DType::F32, "the output has the input's dtype");
    let diff = max_diff(&y16, &y32);
    assert!(diff <= 1e-4, "blocked product differs by {diff}");
    let upstream = random(&[1, rows, out], 4, DType::F32);
    let g16 = (&y16 * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g32 = (&y32 * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (g16, g32) = (
        g16.get(x.as_tensor()).unwrap(),
        g32.get(x.as_tensor()).unwrap(),
    );
    let diff = max_diff(g16, g32);
    assert!(diff <= 1e-3, "blocked input gradient differs by {diff}");

    // bf16 activations through an f32 weight: the output and dx are bf16, dW f32.
    let xb = Var::from_tensor(&random(&[1, rows, width], 5, DType::BF16)).unwrap();
    let wv = Var::from_tensor(&random(&[64, width], 6, DType::F32)).unwrap();
    let y = ops::linear(xb.as_tensor(), wv.as_tensor(), None).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let grads = y
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grads.get(xb.as_tensor()).unwrap().dtype(), DType::BF16);
    assert_eq!(grads.get(wv.as_tensor()).unwrap().dtype(), DType::F32);
    let expected = ops::linear(&xb.to_dtype(DType::F32).unwrap(), wv.as_tensor(), None).unwrap();
    // One rounding to bf16 (8 bits of mantissa) of values up to the largest.
    let largest = max_diff(&expected, &expected.zeros_like().unwrap());
    let diff = max_diff(&y, &expected);
    assert!(
        diff <= largest / 256.0,
        "bf16-stored product differs by {diff} (largest {largest})"
    );
}

/// Every value of `t`, widened to f64 (exactly, from any float dtype).
fn values_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64)?.to_vec1())
        .unwrap()
}

/// RMSNorm of every row of `x` `[.., width]` times `weight`, in f64 loops over the stored
/// values, rounded once to `dtype`: the definition, apart from both ops.
fn rms_norm_by_rows(x: &Tensor, weight: &Tensor, eps: f64, dtype: DType) -> Tensor {
    let values = values_f64(x);
    let w: Vec<f64> = weight.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let normed: Vec<f64> = values
        .chunks(w.len())
        .flat_map(|row| {
            let mean_square = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            let scale = 1.0 / (mean_square + eps).sqrt();
            row.iter().zip(&w).map(move |(v, w)| v * scale * w)
        })
        .collect();
    Tensor::from_vec(normed, x.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The norms compute in f32 on half-precision input, fused and composed alike (the composition
/// is what a GPU runs): both equal the norm of the same stored values computed apart, rounded
/// once.
#[test]
fn norms_compute_in_f32_for_half_precision_input() {
    for dtype in [DType::BF16, DType::F16] {
        let x = (random(&[2, 5, 96], 7, DType::F32) * 30.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let weight = random(&[96], 8, DType::F32);
        let expected = rms_norm_by_rows(&x, &weight, 1e-5, dtype);
        for (what, y) in [
            ("fused", ops::rms_norm(&x, &weight, 1e-5).unwrap()),
            (
                "composed",
                ops::reference::rms_norm(&x, &weight, 1e-5).unwrap(),
            ),
        ] {
            assert_eq!(y.dtype(), dtype);
            // Both are the exact norm rounded once, so they differ by at most one unit in the
            // last place (2^-7 of the value in bf16, 2^-10 in f16) where the f32 and f64
            // values round to either side. A norm computed in the input's precision is off by
            // several.
            let ulp = match dtype {
                DType::BF16 => 2f64.powi(-7),
                _ => 2f64.powi(-10),
            };
            let ours = values_f64(&y);
            let exact = values_f64(&expected);
            let worst = ours
                .iter()
                .zip(&exact)
                .map(|(y, e)| (y - e).abs() / (e.abs() * ulp))
                .fold(0f64, f64::max);
            eprintln!("{what} {dtype:?} rms_norm: within {worst} units in the last place");
            assert!(
                worst <= 1.0,
                "{what} {dtype:?} rms_norm differs by {worst} units in the last place"
            );
        }
    }
}

/// Padding in f16 stays masked (the bias is f32: -1e9 is -inf in f16) and changes no value.
#[test]
fn f16_padding_mask_is_finite_and_exact() {
    let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
    let bias = ops::additive_mask(&mask, DType::F16).unwrap();
    assert_eq!(bias.dtype(), DType::F32);
    let values: Vec<f32> = bias.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        values.iter().all(|v| v.is_finite()) && values[2] < -1e8,
        "{values:?}"
    );
}
