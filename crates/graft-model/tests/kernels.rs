//! The fused CPU kernels against their candle compositions (`ops::reference`): the same values,
//! the same gradients, and gradients that agree with central finite differences in f64.
use candle_core::{DType, Device, Tensor, Var};
use graft_model::init;
use graft_model::ops::{self, reference, AttentionSpec};

/// A function of some input tensors, as the fused and the reference paths compute it.
type Op<'a> = dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + 'a;

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = init::seeded_rng(seed);
    init::normal(&mut rng, shape, 1.0, dtype, &Device::Cpu).unwrap()
}

/// Value and input gradients of `sum(op(inputs) * weights)`.
fn value_and_grads(op: &Op<'_>, inputs: &[Tensor], weights: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&tensors).unwrap();
    let loss = (&out * weights).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| v.zeros_like().unwrap())
        })
        .collect();
    (out, grads)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The fused op and its reference agree (f32 and f64; gradients within the reference's own
/// error), and the fused op's gradients agree with finite differences of its own value in f64
/// at every coordinate of every input.
fn check(name: &str, fused: &Op<'_>, slow: &Op<'_>, shapes: &[&[usize]]) {
    check_within(name, fused, slow, shapes, 0.0)
}

fn check_within(
    name: &str,
    fused: &Op<'_>,
    slow: &Op<'_>,
    shapes: &[&[usize]],
    reference_grad_error: f64,
) {
    for (dtype, tolerance) in [(DType::F32, 2e-5), (DType::F64, 1e-10)] {
        let inputs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| random(s, 10 + i as u64, dtype))
            .collect();
        let probe = fused(&inputs).unwrap();
        let weights = random(probe.dims(), 99, dtype);
        let (fast_out, fast_grads) = value_and_grads(fused, &inputs, &weights);
        let (ref_out, ref_grads) = value_and_grads(slow, &inputs, &weights);
        if dtype == DType::F64 {
            let loss = |inputs: &[Tensor]| -> f64 {
                (fused(inputs).unwrap() * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let h = 1e-6;
            for (i, input) in inputs.iter().enumerate() {
                let base: Vec<f64> = input.flatten_all().unwrap().to_vec1().unwrap();
                let grad: Vec<f64> = fast_grads[i].flatten_all().unwrap().to_vec1().unwrap();
                for (j, analytic) in grad.iter().enumerate() {
                    let shifted = |delta: f64| {
                        let mut values = base.clone();
                        values[j] += delta;
                        let mut moved = inputs.to_vec();
                        moved[i] = Tensor::from_vec(values, input.shape(), &Device::Cpu).unwrap();
                        loss(&moved)
                    };
                    let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
                    assert!(
                        (numeric - analytic).abs() <= 1e-6 * (1.0 + numeric.abs()),
                        "{name}: d/d input {i}[{j}]: finite differences {numeric}, backward {analytic}"
                    );
                }
            }
        }
        let d = max_diff(&fast_out, &ref_out);
        assert!(d < tolerance, "{name} {dtype:?}: values differ by {d}");
        for (i, (f, r)) in fast_grads.iter().zip(&ref_grads).enumerate() {
            let d = max_diff(f, r);
            let scale = max_diff(r, &r.zeros_like().unwrap()).max(1.0);
            assert!(
                d < (tolerance * 10.0).max(reference_grad_error) * scale,
                "{name} {dtype:?}: gradient of input {i} differs from the reference by {d}"
            );
        }
    }
}

#[test]
fn layer_norm_matches_its_composition_and_finite_differences() {
    check(
        "layer_norm",
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        &|t| reference::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        &[&[2, 3, 16], &[16], &[16]],
    );
}

#[test]
fn column_scaling_matches_its_composition_and_finite_differences() {
    check(
        "scale_last_dim",
        &|t| ops::scale_last_dim(&t[0], &t[1]),
        &|t| reference::scale_last_dim(&t[0], &t[1]),
        &[&[3, 5, 12], &[12, 1]],
    );
}

#[test]
fn gelu_matches_its_composition_and_finite_differences() {
    // candle's own GELU backward is accurate to about 1e-6 even in f64 (measured: 1.2e-6 off
    // where this kernel agrees with finite differences to 1e-6 relative).
    check_within(
        "gelu_erf",
        &|t| ops::gelu_erf(&(&t[0] * 3.0)?),
        &|t| reference::gelu_erf(&(&t[0] * 3.0)?),
        &[&[5, 37]],
        1e-5,
    );
}

#[test]
fn linear_through_a_frozen_weight_matches_candle_matmul_and_finite_differences() {
    // The weight and bias are constants of the op: only the input has a gradient.
    for dtype in [DType::F32, DType::F64] {
        let weight = random(&[5, 8], 1, dtype);
        let bias = random(&[5], 2, dtype);
        check(
            &format!("linear {dtype:?}"),
            &|t| {
                ops::linear(
                    &t[0],
                    &weight.to_dtype(t[0].dtype())?,
                    Some(&bias.to_dtype(t[0].dtype())?),
                )
            },
            &|t| {
                reference::linear(
                    &t[0],
                    &weight.to_dtype(t[0].dtype())?,
                    Some(&bias.to_dtype(t[0].dtype())?),
                )
            },
            &[&[2, 3, 8]],
        );
        check(
            &format!("linear without bias, 2-D input {dtype:?}"),
            &|t| ops::linear(&t[0], &weight.to_dtype(t[0].dtype())?, None),
            &|t| reference::linear(&t[0], &weight.to_dtype(t[0].dtype())?, None),
            &[&[4, 8]],
        );
    }
}

#[test]
fn linear_with_a_trained_weight_and_bias_matches_candle_matmul_and_finite_differences() {
    check(
        "linear, every input trained",
        &|t| ops::linear(&t[0], &t[1], Some(&t[2])),
        &|t| reference::linear(&t[0], &t[1], Some(&t[2])),
        &[&[2, 3, 8], &[5, 8], &[5]],
    );
    check(
        "linear, trained weight, no bias",
        &|t| ops::linear(&t[0], &t[1], None),
        &|t| reference::linear(&t[0], &t[1], None),
        &[&[4, 8], &[6, 8]],
    );
}

#[test]
fn linear_with_a_low_rank_update_matches_its_composition_and_finite_differences() {
    // Inputs x, A, B are tracked; the weight, bias and dropout mask are constants of the op.
    for dtype in [DType::F32, DType::F64] {
        let weight = random(&[5, 8], 1, dtype);
        let bias = random(&[5], 2, dtype);
        let mask = (random(&[2, 3, 8], 3, dtype)
            .ge(0.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            * 2.0)
            .unwrap();
        for (bias, mask) in [
            (Some(&bias), None),
            (None, Some(&mask)),
            (Some(&bias), Some(&mask)),
        ] {
            let update = |t: &[Tensor]| graft_model::LowRank {
                a: t[1].clone(),
                b: t[2].clone(),
                input_mask: mask.map(|m| m.to_dtype(t[0].dtype()).unwrap()),
            };
            let constants = |t: &[Tensor]| {
                let d = t[0].dtype();
                (
                    weight.to_dtype(d).unwrap(),
                    bias.map(|b| b.to_dtype(d).unwrap()),
                )
            };
            check(
                &format!(
                    "linear_low_rank {dtype:?}, bias {}, mask {}",
                    bias.is_some(),
                    mask.is_some()
                ),
                &|t| {
                    let (w, b) = constants(t);
                    ops::linear_low_rank(&t[0], &w, b.as_ref(), &update(t))
                },
                &|t| {
                    let (w, b) = constants(t);
                    let x = match mask {
                        Some(m) => (&t[0] * m.to_dtype(t[0].dtype())?)?,
                        None => t[0].clone(),
                    };
                    let delta =
                        reference::linear(&reference::linear(&x, &t[1], None)?, &t[2], None)?;
                    reference::linear(&t[0], &w, b.as_ref())? + delta
                },
                &[&[2, 3, 8], &[3, 8], &[5, 3]],
            );
        }
    }
}

#[test]
fn linear_with_low_rank_updates_of_column_blocks_matches_its_composition_and_finite_differences() {
    // Query, key and value as one product of 12 columns: updates on columns 0..4 (rank 2) and
    // 8..12 (rank 3), none on the key's 4..8. Inputs x, A_q, B_q, A_v, B_v are tracked.
    let weight = random(&[12, 8], 1, DType::F64);
    let bias = random(&[12], 2, DType::F64);
    let updates = |t: &[Tensor]| {
        [(0..4, 1, 2), (8..12, 3, 4)].map(|(columns, a, b)| {
            (
                columns,
                graft_model::LowRank {
                    a: t[a].clone(),
                    b: t[b].clone(),
                    input_mask: None,
                },
            )
        })
    };
    let constants = |t: &[Tensor]| {
        let d = t[0].dtype();
        (weight.to_dtype(d).unwrap(), bias.to_dtype(d).unwrap())
    };
    check(
        "linear_low_ranks",
        &|t| {
            let (w, b) = constants(t);
            let updates = updates(t);
            let refs: Vec<_> = updates.iter().map(|(c, u)| (c.clone(), u)).collect();
            ops::linear_low_ranks(&t[0], &w, Some(&b), &refs)
        },
        &|t| {
            let (w, b) = constants(t);
            let base = reference::linear(&t[0], &w, Some(&b))?;
            let delta = |a: &Tensor, b: &Tensor| {
                reference::linear(&reference::linear(&t[0], a, None)?, b, None)
            };
            Tensor::cat(
                &[
                    (base.narrow(2, 0, 4)? + delta(&t[1], &t[2])?)?,
                    base.narrow(2, 4, 4)?,
                    (base.narrow(2, 8, 4)? + delta(&t[3], &t[4])?)?,
                ],
                2,
            )
        },
        &[&[2, 3, 8], &[2, 8], &[4, 2], &[3, 8], &[4, 3]],
    );
}

#[test]
fn low_rank_updates_with_their_own_dropout_masks_compose_to_the_same_values() {
    // Two updates, each with its own mask: the composition path (one fused node takes at most
    // one mask), against the reference built by hand.
    let x = random(&[2, 3, 8], 1, DType::F64);
    let weight = random(&[12, 8], 2, DType::F64);
    let mask = |seed: u64| {
        (random(&[2, 3, 8], seed, DType::F64)
            .ge(0.0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            * 2.0)
            .unwrap()
    };
    let updates = [(0..4, 3, 4, 5), (8..12, 6, 7, 8)].map(|(columns, a, b, m)| {
        let update = graft_model::LowRank {
            a: random(&[2, 8], a, DType::F64),
            b: random(&[4, 2], b, DType::F64),
            input_mask: Some(mask(m)),
        };
        (columns, update)
    });
    let refs: Vec<_> = updates.iter().map(|(c, u)| (c.clone(), u)).collect();
    let out = ops::linear_low_ranks(&x, &weight, None, &refs).unwrap();
    let base = reference::linear(&x, &weight, None).unwrap();
    let delta = |u: &graft_model::LowRank| {
        let xm = (&x * u.input_mask.as_ref().unwrap()).unwrap();
        reference::linear(&reference::linear(&xm, &u.a, None).unwrap(), &u.b, None).unwrap()
    };
    let want = Tensor::cat(
        &[
            (base.narrow(2, 0, 4).unwrap() + delta(&updates[0].1)).unwrap(),
            base.narrow(2, 4, 4).unwrap(),
            (base.narrow(2, 8, 4).unwrap() + delta(&updates[1].1)).unwrap(),
        ],
        2,
    )
    .unwrap();
    assert!(max_diff(&out, &want) < 1e-12);
}

/// Frozen constants of a fused op in f32 and in f64, each `scale · N(0, 1) + offset` of its
/// shape; `like(t)` picks those of `t`'s dtype.
struct Constants {
    f32: Vec<Tensor>,
    f64: Vec<Tensor>,
}

impl Constants {
    fn new(specs: &[(&[usize], f64, f64)]) -> Self {
        let make = |dtype: DType| {
            specs
                .iter()
                .enumerate()
                .map(|(i, (shape, scale, offset))| {
                    random(shape, 1 + i as u64, dtype)
                        .affine(*scale, *offset)
                        .unwrap()
                })
                .collect()
        };
        Self {
            f32: make(DType::F32),
            f64: make(DType::F64),
        }
    }

    fn like(&self, t: &Tensor) -> &[Tensor] {
        if t.dtype() == DType::F32 {
            &self.f32
        } else {
            &self.f64
        }
    }
}

/// A projection `[w, b]` added to a residual and normalised by `[gamma, beta]`, eps 1e-12.
fn residual_norm([weight, bias, gamma, beta]: [&Tensor; 4]) -> ops::ResidualNorm {
    ops::ResidualNorm {
        weight: weight.clone(),
        bias: Some(bias.clone()),
        gamma: gamma.clone(),
        beta: beta.clone(),
        eps: 1e-12,
    }
}

#[test]
fn feed_forward_block_matches_its_composition_and_finite_differences() {
    // The block's tensors are frozen constants of the op; its input has the gradient.
    let (hidden, ffn) = (8, 12);
    let constants = Constants::new(&[
        (&[ffn, hidden], 0.4, 0.0),
        (&[ffn], 0.3, 0.0),
        (&[hidden, ffn], 0.4, 0.0),
        (&[hidden], 0.3, 0.0),
        (&[hidden], 0.2, 1.0),
        (&[hidden], 0.2, 0.0),
    ]);
    let pick = |t: &Tensor| match constants.like(t) {
        [w_in, b_in, w_out, b_out, gamma, beta] => [w_in, b_in, w_out, b_out, gamma, beta],
        _ => unreachable!("six constants"),
    };
    check_within(
        "feed_forward_block",
        &|t| {
            let [w_in, b_in, w_out, b_out, gamma, beta] = pick(&t[0]);
            let block = ops::FeedForward {
                w_in: w_in.clone(),
                b_in: Some(b_in.clone()),
                out: residual_norm([w_out, b_out, gamma, beta]),
            };
            ops::feed_forward_block(&t[0], &block)
        },
        &|t| {
            let [w_in, b_in, w_out, b_out, gamma, beta] = pick(&t[0]);
            let inner = reference::gelu_erf(&reference::linear(&t[0], w_in, Some(b_in))?)?;
            let out = reference::linear(&inner, w_out, Some(b_out))?;
            reference::layer_norm(&(out + &t[0])?, gamma, beta, 1e-12)
        },
        &[&[2, 3, hidden]],
        // candle's GELU backward in the reference is accurate to about 1e-6 (see the GELU test).
        1e-5,
    );
}

#[test]
fn projection_norm_matches_its_composition_and_finite_differences() {
    // The projection and norm are frozen constants of the op; input and residual are trained.
    let (hidden, width) = (8, 6);
    let constants = Constants::new(&[
        (&[hidden, width], 0.4, 0.0),
        (&[hidden], 0.3, 0.0),
        (&[hidden], 0.2, 1.0),
        (&[hidden], 0.2, 0.0),
    ]);
    let pick = |t: &Tensor| match constants.like(t) {
        [w, b, gamma, beta] => [w, b, gamma, beta],
        _ => unreachable!("four constants"),
    };
    check(
        "projection_norm",
        &|t| ops::projection_norm(&t[0], &t[1], &residual_norm(pick(&t[0]))),
        &|t| {
            let [w, b, gamma, beta] = pick(&t[0]);
            reference::layer_norm(
                &(reference::linear(&t[0], w, Some(b))? + &t[1])?,
                gamma,
                beta,
                1e-12,
            )
        },
        &[&[2, 3, width], &[2, 3, hidden]],
    );
}

#[test]
fn fused_blocks_and_their_compositions_give_bit_identical_outputs() {
    // A model must compute the same logits whether its tensors are trained (composed) or
    // reloaded frozen (fused): full fine-tuning's reload test.
    let x = random(&[3, 7, 16], 1, DType::F32);
    let residual = random(&[3, 7, 24], 2, DType::F32);
    let w_out = (random(&[24, 32], 4, DType::F32) * 0.2).unwrap();
    let w = (random(&[24, 16], 5, DType::F32) * 0.2).unwrap();
    let [b_in, b_out, gamma, beta] =
        [6u64, 7, 8, 9].map(|seed| random(&[if seed == 6 { 32 } else { 24 }], seed, DType::F32));
    let trained = |t: &Tensor| Var::from_tensor(t).unwrap().as_tensor().clone();
    let projection = |w: &Tensor, gamma: &Tensor| {
        let block = residual_norm([w, &b_out, gamma, &beta]);
        ops::projection_norm(&x, &residual, &block).unwrap()
    };
    assert_eq!(
        max_diff(
            &projection(&w, &gamma),
            &projection(&trained(&w), &trained(&gamma))
        ),
        0.0
    );
    let hidden = random(&[3, 7, 24], 10, DType::F32);
    let block = |w_in: &Tensor, gamma: &Tensor| {
        let block = ops::FeedForward {
            w_in: w_in.clone(),
            b_in: Some(b_in.clone()),
            out: residual_norm([&w_out, &b_out, gamma, &beta]),
        };
        ops::feed_forward_block(&hidden, &block).unwrap()
    };
    let w_in = (random(&[32, 24], 11, DType::F32) * 0.2).unwrap();
    assert_eq!(
        max_diff(
            &block(&w_in, &gamma),
            &block(&trained(&w_in), &trained(&gamma))
        ),
        0.0
    );
}

/// A padding bias `[batch, keys]` whose last `padded` keys of row 1 are blocked.
fn key_bias(batch: usize, keys: usize, padded: usize, dtype: DType) -> Tensor {
    let mask: Vec<f32> = (0..batch * keys)
        .map(|i| f32::from(!(i / keys == 1 && i % keys >= keys - padded)))
        .collect();
    let mask = Tensor::from_vec(mask, (batch, keys), &Device::Cpu).unwrap();
    ops::additive_mask(&mask, dtype).unwrap()
}

fn check_attention(
    name: &str,
    heads: usize,
    kv_heads: usize,
    (tq, tk): (usize, usize),
    causal: bool,
    padded: usize,
) {
    let hd = 4;
    let batch = 2;
    type Attention = fn(&Tensor, &Tensor, &Tensor, &AttentionSpec) -> candle_core::Result<Tensor>;
    let with_spec = |attention: Attention, t: &[Tensor]| {
        let bias = (padded > 0).then(|| key_bias(batch, tk, padded, t[0].dtype()));
        let spec = AttentionSpec {
            heads,
            kv_heads,
            causal,
            key_bias: bias.as_ref(),
        };
        attention(&t[0], &t[1], &t[2], &spec)
    };
    check(
        name,
        &|t| with_spec(ops::attention, t),
        &|t| with_spec(reference::attention, t),
        &[
            &[batch, tq, heads * hd],
            &[batch, tk, kv_heads * hd],
            &[batch, tk, kv_heads * hd],
        ],
    );
}

#[test]
fn attention_with_padding_matches_its_composition_and_finite_differences() {
    check_attention("bidirectional, padded", 3, 3, (5, 5), false, 2);
}

#[test]
fn attention_with_key_prefixes_matches_its_composition_and_finite_differences() {
    // Two more keys than queries, as prefix tuning splices in.
    check_attention("bidirectional, prefix keys", 2, 2, (4, 6), false, 1);
}

#[test]
fn causal_grouped_query_attention_matches_its_composition_and_finite_differences() {
    check_attention("causal, grouped-query", 4, 2, (5, 7), true, 0);
    check_attention("causal, multi-query, padded", 3, 1, (4, 4), true, 1);
}

#[test]
fn packed_attention_matches_its_composition_and_finite_differences() {
    // q, k and v as the column blocks of one [batch, seq, 3 x 8] input: 2 heads of 4.
    for dtype in [DType::F32, DType::F64] {
        let bias = key_bias(2, 5, 2, dtype);
        let spec = AttentionSpec {
            heads: 2,
            kv_heads: 2,
            causal: false,
            key_bias: Some(&bias),
        };
        check(
            &format!("attention_packed {dtype:?}"),
            &|t| {
                let bias = bias.to_dtype(t[0].dtype())?;
                let spec = AttentionSpec {
                    key_bias: Some(&bias),
                    ..spec
                };
                ops::attention_packed(&t[0], &spec)
            },
            &|t| {
                let bias = bias.to_dtype(t[0].dtype())?;
                let spec = AttentionSpec {
                    key_bias: Some(&bias),
                    ..spec
                };
                let part = |i: usize| t[0].narrow(2, 8 * i, 8);
                reference::attention(&part(0)?, &part(1)?, &part(2)?, &spec)
            },
            &[&[2, 5, 24]],
        );
    }
}

#[test]
fn attention_refuses_shapes_that_do_not_fit_its_heads() {
    let q = random(&[1, 3, 12], 1, DType::F32);
    let k = random(&[1, 3, 8], 2, DType::F32);
    let spec = AttentionSpec {
        heads: 3,
        kv_heads: 3,
        causal: false,
        key_bias: None,
    };
    let err = ops::attention(&q, &k, &k, &spec).unwrap_err().to_string();
    assert!(err.contains("do not fit 3 heads"), "{err}");
    let short = random(&[1, 2, 12], 3, DType::F32);
    let spec = AttentionSpec {
        heads: 3,
        kv_heads: 3,
        causal: true,
        key_bias: None,
    };
    let err = ops::attention(&q, &short, &short, &spec)
        .unwrap_err()
        .to_string();
    assert!(err.contains("causal"), "{err}");
}

/// The decoder's compositions: gradients against finite differences at every coordinate of
/// every input, and values against candle's fused forward-only ops.
#[test]
fn rms_norm_matches_its_composition_finite_differences_and_candle() {
    check(
        "rms_norm",
        &|t| ops::rms_norm(&t[0], &t[1], 1e-5),
        &|t| reference::rms_norm(&t[0], &t[1], 1e-5),
        &[&[2, 3, 16], &[16]],
    );
    let x = random(&[2, 3, 16], 1, DType::F32);
    let w = random(&[16], 2, DType::F32);
    let candle = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
    let d = max_diff(&ops::rms_norm(&x, &w, 1e-5).unwrap(), &candle);
    assert!(d < 1e-5, "rms_norm differs from candle's by {d}");
}

/// Rotary embedding as a product: each position's head vector times a `[d, d]` rotation
/// matrix `Σ_p cos[t, p] C_p + sin[t, p] S_p + E` (C_p and S_p place pair p's cosine and sine,
/// E keeps the unrotated features), independent of the ops' narrow-and-stack composition.
/// Pairs are (2p, 2p + 1) interleaved, else (p, p + half).
fn rope_as_rotation_matrices(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> candle_core::Result<Tensor> {
    let (b, t, n, d) = x.dims4()?;
    let half = cos.dim(1)?;
    let (mut c, mut s, mut e) = (
        vec![0f64; half * d * d],
        vec![0f64; half * d * d],
        vec![0f64; d * d],
    );
    for p in 0..half {
        let (i, j) = if interleaved {
            (2 * p, 2 * p + 1)
        } else {
            (p, p + half)
        };
        // Row-vector convention, out = x · R: out_i = x_i cos - x_j sin, out_j = x_j cos + x_i sin.
        c[p * d * d + i * d + i] = 1.0;
        c[p * d * d + j * d + j] = 1.0;
        s[p * d * d + j * d + i] = -1.0;
        s[p * d * d + i * d + j] = 1.0;
    }
    for k in 2 * half..d {
        e[k * d + k] = 1.0;
    }
    let dtype = x.dtype();
    let constant = |v: Vec<f64>, shape: (usize, usize)| {
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
    };
    let c = constant(c, (half, d * d))?;
    let s = constant(s, (half, d * d))?;
    let e = constant(e, (1, d * d))?;
    let rotations = (cos.matmul(&c)? + sin.matmul(&s)?)?
        .broadcast_add(&e)?
        .reshape((t, d, d))?;
    let by_position = x.transpose(0, 1)?.contiguous()?.reshape((t, b * n, d))?;
    by_position
        .matmul(&rotations)?
        .reshape((t, b, n, d))?
        .transpose(0, 1)?
        .contiguous()
}

#[test]
fn rope_has_a_finite_difference_exact_backward_and_matches_candle() {
    for interleaved in [false, true] {
        // The whole head (Llama) and half of it (ChatGLM).
        for half in [4, 2] {
            // Tracked angles take the composition: its backward reaches them too. Against the
            // same rotation written as one matrix per position.
            check(
                &format!("rope interleaved={interleaved} half={half}, tracked angles"),
                &|t| ops::rope(&t[0], &t[1], &t[2], interleaved),
                &|t| rope_as_rotation_matrices(&t[0], &t[1], &t[2], interleaved),
                &[&[2, 3, 2, 8], &[3, half], &[3, half]],
            );
            // Constant angles (the model's) take the fused kernel.
            let angles = random(&[3, half], 7, DType::F64);
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let like = |a: &Tensor, x: &Tensor| a.to_dtype(x.dtype()).unwrap();
            check(
                &format!("rope interleaved={interleaved} half={half}, fused"),
                &|t| ops::rope(&t[0], &like(&cos, &t[0]), &like(&sin, &t[0]), interleaved),
                &|t| reference::rope(&t[0], &like(&cos, &t[0]), &like(&sin, &t[0]), interleaved),
                &[&[2, 3, 2, 8]],
            );
        }
        // candle's rope/rope_i take [b, heads, t, d] and rotate the whole head.
        let x = random(&[2, 5, 3, 8], 4, DType::F32);
        let angles = random(&[5, 4], 5, DType::F32);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let ours = ops::rope(&x, &cos, &sin, interleaved).unwrap();
        let xt = x.transpose(1, 2).unwrap().contiguous().unwrap();
        let candle = if interleaved {
            candle_nn::rotary_emb::rope_i(&xt, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&xt, &cos, &sin)
        }
        .unwrap()
        .transpose(1, 2)
        .unwrap();
        let d = max_diff(&ours, &candle);
        assert!(
            d < 1e-5,
            "rope (interleaved {interleaved}) differs from candle's by {d}"
        );
    }
}

#[test]
fn swiglu_kernel_matches_candle_silu_times_up_with_an_exact_backward() {
    let fused = |t: &[Tensor]| ops::swiglu(&t[0], &t[1]);
    let composed = |t: &[Tensor]| ops::reference::swiglu(&t[0], &t[1]);
    // 3 x 7000 elements: several parallel parts.
    check("swiglu", &fused, &composed, &[&[3, 7000], &[3, 7000]]);
    check("swiglu", &fused, &composed, &[&[2, 3, 8], &[2, 3, 8]]);
}
