//! P-tuning's prompt encoders: an embedding table of the virtual tokens reparameterised by an
//! MLP or by a bidirectional LSTM followed by an MLP head, with torch's semantics.
//!
//! Every op here has a backward in candle (matmul, broadcast arithmetic, `tanh`, `relu`,
//! `narrow`, `cat`); the sigmoid is written through `tanh`.
use graft_peft::candle::{DType, Device, Result, Tensor, Var};
use graft_peft::graft_model::init::{self, SeededRng};

/// torch's `nn.Linear`: `y = x·Wᵀ + b`.
pub struct Linear {
    /// `[out, in]`.
    pub weight: Var,
    /// `[out]`.
    pub bias: Var,
}

impl Linear {
    /// torch's default init: weight and bias uniform(-1/sqrt(in), 1/sqrt(in)).
    pub fn new(
        rng: &mut SeededRng,
        inp: usize,
        out: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bound = init::kaiming_uniform_bound(inp);
        Ok(Self {
            weight: Var::from_tensor(&init::uniform(rng, &[out, inp], bound, dtype, device)?)?,
            bias: Var::from_tensor(&init::uniform(rng, &[out], bound, dtype, device)?)?,
        })
    }

    /// `x` is `[rows, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())
    }
}

/// Linear layers with a ReLU between each pair (none after the last), as PEFT's `mlp_head`
/// (`nn.Sequential` of Linear, ReLU, Linear, ...: the linears sit at indices 0, 2, 4).
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    /// Linear layers of the given widths: `widths[0] -> widths[1] -> ...`.
    pub fn new(
        rng: &mut SeededRng,
        widths: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layers = widths
            .windows(2)
            .map(|w| Linear::new(rng, w[0], w[1], dtype, device))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                x = x.relu()?;
            }
            x = layer.forward(&x)?;
        }
        Ok(x)
    }

    /// Tensors under PEFT's module names (`{prefix}.{index}.weight`, `.bias`).
    pub fn named(&self, prefix: &str) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                [
                    (format!("{prefix}.{}.weight", 2 * i), l.weight.clone()),
                    (format!("{prefix}.{}.bias", 2 * i), l.bias.clone()),
                ]
            })
            .collect()
    }
}

/// `1 / (1 + e^-x)` as `tanh(x/2)/2 + 1/2` (exact), built from ops with a backward.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x * 0.5)?.tanh()?.affine(0.5, 0.5)
}

/// One direction of one LSTM layer, torch's layout: gates i, f, g, o stacked in that order.
pub struct LstmDirection {
    /// `[4h, in]`.
    pub weight_ih: Var,
    /// `[4h, h]`.
    pub weight_hh: Var,
    /// `[4h]`.
    pub bias_ih: Var,
    /// `[4h]`.
    pub bias_hh: Var,
}

impl LstmDirection {
    /// torch's init: every tensor uniform(-1/sqrt(h), 1/sqrt(h)).
    pub fn new(
        rng: &mut SeededRng,
        inp: usize,
        hidden: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut var = |shape: &[usize]| -> Result<Var> {
            Var::from_tensor(&init::uniform(rng, shape, bound, dtype, device)?)
        };
        Ok(Self {
            weight_ih: var(&[4 * hidden, inp])?,
            weight_hh: var(&[4 * hidden, hidden])?,
            bias_ih: var(&[4 * hidden])?,
            bias_hh: var(&[4 * hidden])?,
        })
    }

    pub fn hidden(&self) -> usize {
        self.weight_hh.dims()[1]
    }

    /// The input's contribution to the gates of every step at once: `x·W_ihᵀ + b_ih + b_hh`,
    /// `[steps, 4h]` for `x` `[steps, in]`.
    pub fn input_gates(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight_ih.as_tensor().t()?)?
            .broadcast_add(&(self.bias_ih.as_tensor() + self.bias_hh.as_tensor())?)
    }

    /// One step: `gates` is the input's contribution `[1, 4h]` (see [`Self::input_gates`]),
    /// `h` and `c` the previous state `[1, h]`. Returns the new `(h, c)`:
    /// `c' = f·c + i·g`, `h' = o·tanh(c')`.
    pub fn step(&self, gates: &Tensor, h: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor)> {
        let hidden = self.hidden();
        let gates = (gates + h.matmul(&self.weight_hh.as_tensor().t()?)?)?;
        let i = sigmoid(&gates.narrow(1, 0, hidden)?)?;
        let f = sigmoid(&gates.narrow(1, hidden, hidden)?)?;
        let g = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
        let o = sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
        let c = ((f * c)? + (i * g)?)?;
        let h = (o * c.tanh()?)?;
        Ok((h, c))
    }

    /// Runs over `x` `[steps, in]` from a zero state, forward in time or (`reverse`) backward;
    /// returns the hidden states `[steps, h]` in the order of `x`'s rows.
    pub fn run(&self, x: &Tensor, reverse: bool) -> Result<Tensor> {
        let steps = x.dim(0)?;
        let gates = self.input_gates(x)?;
        let zero = Tensor::zeros((1, self.hidden()), x.dtype(), x.device())?;
        let (mut h, mut c) = (zero.clone(), zero);
        let mut outputs = vec![None; steps];
        let order: Vec<usize> = if reverse {
            (0..steps).rev().collect()
        } else {
            (0..steps).collect()
        };
        for t in order {
            (h, c) = self.step(&gates.narrow(0, t, 1)?, &h, &c)?;
            outputs[t] = Some(h.clone());
        }
        let outputs: Vec<Tensor> = outputs.into_iter().flatten().collect();
        Tensor::cat(&outputs, 0)
    }
}

/// torch's `nn.LSTM(bidirectional=True, batch_first=True)` on one sequence, zero initial state.
pub struct BiLstm {
    /// Per layer: (forward, reverse). Layer 0 reads the input, later layers the concatenated
    /// `[forward, reverse]` outputs of the layer below (`2h` wide).
    pub layers: Vec<(LstmDirection, LstmDirection)>,
}

impl BiLstm {
    pub fn new(
        rng: &mut SeededRng,
        inp: usize,
        hidden: usize,
        num_layers: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..num_layers)
            .map(|l| {
                let width = if l == 0 { inp } else { 2 * hidden };
                Ok((
                    LstmDirection::new(rng, width, hidden, dtype, device)?,
                    LstmDirection::new(rng, width, hidden, dtype, device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// `x` `[steps, in]` to `[steps, 2h]`. `dropout` is applied to the output of every layer
    /// but the last (torch's `dropout` argument); it returns its input when not training.
    pub fn forward(
        &self,
        x: &Tensor,
        dropout: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (l, (fwd, bwd)) in self.layers.iter().enumerate() {
            if l > 0 {
                x = dropout(&x)?;
            }
            x = Tensor::cat(&[fwd.run(&x, false)?, bwd.run(&x, true)?], 1)?;
        }
        Ok(x)
    }

    /// Tensors under torch's parameter names (`weight_ih_l0`, `bias_hh_l1_reverse`, ...).
    pub fn named(&self, prefix: &str) -> Vec<(String, Var)> {
        let mut named = Vec::new();
        for (l, (fwd, bwd)) in self.layers.iter().enumerate() {
            for (suffix, dir) in [("", fwd), ("_reverse", bwd)] {
                for (name, var) in [
                    ("weight_ih", &dir.weight_ih),
                    ("weight_hh", &dir.weight_hh),
                    ("bias_ih", &dir.bias_ih),
                    ("bias_hh", &dir.bias_hh),
                ] {
                    named.push((format!("{prefix}.{name}_l{l}{suffix}"), var.clone()));
                }
            }
        }
        named
    }
}

/// What turns the embedding table into the virtual tokens.
pub enum Reparameterization {
    /// Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d).
    Mlp(Mlp),
    /// Bidirectional LSTM (hidden h), then Linear(2h, 2h) -> ReLU -> Linear(2h, d).
    Lstm(BiLstm, Mlp),
}

/// PEFT's `PromptEncoder` while training: embedding `[n, d]` then the reparameterisation.
pub struct PromptEncoder {
    /// `[n, d]`, normal(0, 1) as torch's `nn.Embedding`; the input ids are `0..n`, so the
    /// embedded input is the table itself.
    pub embedding: Var,
    pub encoder: Reparameterization,
}

impl PromptEncoder {
    pub fn mlp(
        rng: &mut SeededRng,
        n: usize,
        token_dim: usize,
        hidden: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let embedding = Var::from_tensor(&init::normal(rng, &[n, token_dim], 1.0, dtype, device)?)?;
        let mlp = Mlp::new(rng, &[token_dim, hidden, hidden, token_dim], dtype, device)?;
        Ok(Self {
            embedding,
            encoder: Reparameterization::Mlp(mlp),
        })
    }

    pub fn lstm(
        rng: &mut SeededRng,
        n: usize,
        token_dim: usize,
        hidden: usize,
        num_layers: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let embedding = Var::from_tensor(&init::normal(rng, &[n, token_dim], 1.0, dtype, device)?)?;
        let lstm = BiLstm::new(rng, token_dim, hidden, num_layers, dtype, device)?;
        let head = Mlp::new(rng, &[2 * hidden, 2 * hidden, token_dim], dtype, device)?;
        Ok(Self {
            embedding,
            encoder: Reparameterization::Lstm(lstm, head),
        })
    }

    /// The virtual tokens `[n, d]`.
    pub fn forward(&self, dropout: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let x = self.embedding.as_tensor();
        match &self.encoder {
            Reparameterization::Mlp(mlp) => mlp.forward(x),
            Reparameterization::Lstm(lstm, head) => head.forward(&lstm.forward(x, dropout)?),
        }
    }

    /// Every tensor under its name in PEFT's model (`prompt_encoder.{adapter}.` + this).
    pub fn named(&self, prefix: &str) -> Vec<(String, Var)> {
        let mut named = vec![(format!("{prefix}.embedding.weight"), self.embedding.clone())];
        match &self.encoder {
            Reparameterization::Mlp(mlp) => named.extend(mlp.named(&format!("{prefix}.mlp_head"))),
            Reparameterization::Lstm(lstm, head) => {
                named.extend(lstm.named(&format!("{prefix}.lstm_head")));
                named.extend(head.named(&format!("{prefix}.mlp_head")));
            }
        }
        named
    }
}

#[cfg(test)]
mod p_tuning_tests {
    use super::*;
    use proptest::prelude::*;

    fn var(values: &[f64], shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn sigmoid_matches_its_definition() {
        let x = Tensor::new(&[-3.0f64, -0.5, 0.0, 0.7, 4.0], &Device::Cpu).unwrap();
        for (got, x) in values(&sigmoid(&x).unwrap()).iter().zip(values(&x)) {
            assert!((got - 1.0 / (1.0 + (-x).exp())).abs() < 1e-15);
        }
    }

    /// in = 1, h = 1, x = 1, previous h = 0.5, previous c = 1, with
    /// W_ih = [1, 0, 2, -1] (rows i, f, g, o), W_hh = [2, 0, 0, 2], b_ih = [-1, 0, 0, 0.5],
    /// b_hh = [-1, 0, 0, 0.5]. Pre-activations:
    ///   i: 1·1 + 2·0.5 - 1 - 1 = 0        -> sigmoid 0.5
    ///   f: 0                              -> sigmoid 0.5
    ///   g: 2·1 = 2                        -> tanh(2) = 0.964027580075817
    ///   o: -1·1 + 2·0.5 + 0.5 + 0.5 = 1   -> sigmoid(1) = 0.731058578630005
    /// c' = f·c + i·g = 0.5 + 0.5·0.964027580075817 = 0.982013790037908
    /// h' = o·tanh(c') = 0.731058578630005 · 0.753936336747901 = 0.551171626720433
    #[test]
    fn lstm_cell_matches_a_hand_computed_step() {
        let cell = LstmDirection {
            weight_ih: var(&[1.0, 0.0, 2.0, -1.0], &[4, 1]),
            weight_hh: var(&[2.0, 0.0, 0.0, 2.0], &[4, 1]),
            bias_ih: var(&[-1.0, 0.0, 0.0, 0.5], &[4]),
            bias_hh: var(&[-1.0, 0.0, 0.0, 0.5], &[4]),
        };
        let x = Tensor::new(&[[1.0f64]], &Device::Cpu).unwrap();
        let h = Tensor::new(&[[0.5f64]], &Device::Cpu).unwrap();
        let c = Tensor::new(&[[1.0f64]], &Device::Cpu).unwrap();
        let (h, c) = cell.step(&cell.input_gates(&x).unwrap(), &h, &c).unwrap();
        let c = values(&c)[0];
        let h = values(&h)[0];
        assert!((c - 0.982_013_790_037_908).abs() < 1e-12, "c' = {c}");
        assert!((h - 0.551_171_626_720_433).abs() < 1e-12, "h' = {h}");
    }

    /// A plain scalar LSTM, torch's equations, for comparison.
    fn reference_direction(dir: &LstmDirection, xs: &[Vec<f64>], reverse: bool) -> Vec<Vec<f64>> {
        let hidden = dir.hidden();
        let w_ih = dir.weight_ih.as_tensor().to_vec2::<f64>().unwrap();
        let w_hh = dir.weight_hh.as_tensor().to_vec2::<f64>().unwrap();
        let b: Vec<f64> = values(dir.bias_ih.as_tensor())
            .iter()
            .zip(values(dir.bias_hh.as_tensor()))
            .map(|(a, b)| a + b)
            .collect();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let (mut h, mut c) = (vec![0.0; hidden], vec![0.0; hidden]);
        let mut out = vec![vec![]; xs.len()];
        let order: Vec<usize> = if reverse {
            (0..xs.len()).rev().collect()
        } else {
            (0..xs.len()).collect()
        };
        for t in order {
            let pre: Vec<f64> = (0..4 * hidden)
                .map(|r| {
                    b[r] + (0..xs[t].len()).map(|k| w_ih[r][k] * xs[t][k]).sum::<f64>()
                        + (0..hidden).map(|k| w_hh[r][k] * h[k]).sum::<f64>()
                })
                .collect();
            for j in 0..hidden {
                let (i, f) = (sig(pre[j]), sig(pre[hidden + j]));
                let (g, o) = (pre[2 * hidden + j].tanh(), sig(pre[3 * hidden + j]));
                c[j] = f * c[j] + i * g;
                h[j] = o * c[j].tanh();
            }
            out[t] = h.clone();
        }
        out
    }

    #[test]
    fn bidirectional_lstm_matches_a_scalar_reference() {
        let mut rng = init::seeded_rng(3);
        let lstm = BiLstm::new(&mut rng, 3, 2, 2, DType::F64, &Device::Cpu).unwrap();
        let x = init::normal(&mut rng, &[5, 3], 1.0, DType::F64, &Device::Cpu).unwrap();
        let got = lstm
            .forward(&x, &|t| Ok(t.clone()))
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let mut xs = x.to_vec2::<f64>().unwrap();
        for (fwd, bwd) in &lstm.layers {
            let (f, b) = (
                reference_direction(fwd, &xs, false),
                reference_direction(bwd, &xs, true),
            );
            xs = f.into_iter().zip(b).map(|(f, b)| [f, b].concat()).collect();
        }
        assert_eq!(got.len(), 5);
        for (g, w) in got.iter().flatten().zip(xs.iter().flatten()) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {xs:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The encoder maps `[n, d]` to `[n, d]` whatever its kind and sizes.
        #[test]
        fn encoder_output_is_n_by_token_dim(
            n in 1usize..6, d in 1usize..8, hidden in 1usize..6, layers in 1usize..3,
            lstm in any::<bool>(), seed in any::<u64>(),
        ) {
            let mut rng = init::seeded_rng(seed);
            let encoder = if lstm {
                PromptEncoder::lstm(&mut rng, n, d, hidden, layers, DType::F64, &Device::Cpu)
            } else {
                PromptEncoder::mlp(&mut rng, n, d, hidden, DType::F64, &Device::Cpu)
            }.unwrap();
            let out = encoder.forward(&|t| Ok(t.clone())).unwrap();
            prop_assert_eq!(out.dims(), &[n, d]);
            let expected = if lstm { 1 + 8 * layers + 4 } else { 1 + 6 };
            prop_assert_eq!(encoder.named("p").len(), expected);
        }
    }
}
