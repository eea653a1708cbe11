//! Layers shared by the architectures, each calling the method hooks where a method may act.
use crate::hooks::{Hooks, LinearSite, SiteInfo};
use crate::ops;
use crate::weights::Weights;
use crate::Result;
use candle_core::{Tensor, Var};

/// A projection with a stable Hugging Face module name; a linear site for the hooks.
pub struct Linear {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    layer: Option<usize>,
}

impl Linear {
    /// Loads `{name}.weight` (`[out, in]`) and, if `with_bias`, `{name}.bias`.
    pub fn load(
        weights: &Weights,
        name: &str,
        in_features: usize,
        out_features: usize,
        with_bias: bool,
        layer: Option<usize>,
    ) -> Result<Self> {
        let weight = weights.get(&format!("{name}.weight"), &[out_features, in_features])?;
        let bias = if with_bias {
            Some(weights.get(&format!("{name}.bias"), &[out_features])?)
        } else {
            None
        };
        Ok(Self::new(name, weight, bias, layer))
    }

    pub fn new(name: &str, weight: Tensor, bias: Option<Tensor>, layer: Option<usize>) -> Self {
        Self {
            name: name.to_string(),
            weight,
            bias,
            layer,
        }
    }

    pub fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        // A weight that is itself trained (full fine-tuning) needs candle's full matmul backward.
        let base = if self.weight.track_op() {
            ops::plain_linear(x, &self.weight, self.bias.as_ref())?
        } else {
            ops::frozen_linear(x, &self.weight, self.bias.as_ref())?
        };
        let site = LinearSite {
            name: &self.name,
            weight: &self.weight,
            bias: self.bias.as_ref(),
        };
        Ok(hooks.linear(&site, x, base)?)
    }

    pub fn info(&self) -> SiteInfo {
        let (out_features, in_features) = self.weight.dims2().unwrap_or((0, 0));
        SiteInfo {
            name: self.name.clone(),
            in_features,
            out_features,
            layer: self.layer,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Replaces the weight (merging an adapter in or out); the shape must not change.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight.dims() {
            return Err(crate::Error::InvalidConfig(format!(
                "{}: new weight has shape {:?}, expected {:?}",
                self.name,
                weight.dims(),
                self.weight.dims()
            )));
        }
        self.weight = weight;
        Ok(())
    }
}

/// Layer normalisation with a backward (see [`ops::layer_norm`]).
pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(weights: &Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gamma: weights.get(&format!("{name}.weight"), &[size])?,
            beta: weights.get(&format!("{name}.bias"), &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(x, &self.gamma, &self.beta, self.eps)?)
    }

    /// `(weight, bias)` under transformers' names.
    pub fn tensors(&self) -> [(&'static str, &Tensor); 2] {
        [("weight", &self.gamma), ("bias", &self.beta)]
    }
}

/// A trainable classification head `[num_labels, hidden]` (PEFT's modules_to_save).
pub struct ClassifierHead {
    weight: Var,
    bias: Var,
}

impl ClassifierHead {
    pub fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(&weight)?,
            bias: Var::from_tensor(&bias)?,
        })
    }

    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(ops::plain_linear(
            pooled,
            self.weight.as_tensor(),
            Some(self.bias.as_tensor()),
        )?)
    }

    /// The head's tensors under their module-relative names (`weight`, `bias`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("weight".to_string(), self.weight.clone()),
            ("bias".to_string(), self.bias.clone()),
        ]
    }

    /// Sets the head from saved tensors, checking their shapes.
    pub fn load_from(&self, weight: &Tensor, bias: &Tensor) -> Result<()> {
        for (var, value, what) in [(&self.weight, weight, "weight"), (&self.bias, bias, "bias")] {
            if var.dims() != value.dims() {
                return Err(crate::Error::InvalidConfig(format!(
                    "classifier.{what} has shape {:?}, the model's head expects {:?}",
                    value.dims(),
                    var.dims()
                )));
            }
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}
