//! Layers shared by the architectures, each calling the method hooks where a method may act.
use crate::error::{Error, Result};
use crate::hooks::{Hooks, LinearSite, SiteInfo};
use crate::ops;
use crate::quant::QuantizedWeight;
use crate::weights::Weights;
use candle_core::{Tensor, Var};

/// A base-model tensor under its checkpoint key (e.g. `bert.embeddings.word_embeddings.weight`).
/// Frozen unless a method substitutes a tensor of its own through [`Hooks::parameter`].
pub struct Param {
    key: String,
    value: Tensor,
}

impl Param {
    pub fn new(key: String, value: Tensor) -> Self {
        Self { key, value }
    }

    /// Loads `name` (resolved through the weights' prefixes) with exactly `shape`.
    pub fn load(weights: &Weights, name: &str, shape: &[usize]) -> Result<Self> {
        Ok(Self::new(
            weights.canonical(name),
            weights.get(name, shape)?,
        ))
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The frozen base value.
    pub fn value(&self) -> &Tensor {
        &self.value
    }

    /// The tensor a forward pass uses: the method's substitute if it has one, else the base.
    /// A substitute must have the base's shape; one of another dtype (an f32 master copy of a
    /// bf16 base, as full fine-tuning keeps) is used cast to the base's dtype, with a backward.
    pub fn resolve(&self, hooks: &dyn Hooks) -> Result<Tensor> {
        match hooks.parameter(&self.key) {
            None => Ok(self.value.clone()),
            Some(t) if t.dims() == self.value.dims() && t.dtype().is_float() => {
                Ok(t.to_dtype(self.value.dtype())?)
            }
            Some(t) => Err(Error::InvalidConfig(format!(
                "the method's substitute for `{}` is {:?} {:?}, the base tensor is {:?} {:?}",
                self.key,
                t.dtype(),
                t.dims(),
                self.value.dtype(),
                self.value.dims()
            ))),
        }
    }

    /// Replaces the base value (merging an adapter in or out); the shape must not change.
    pub fn set(&mut self, value: Tensor) -> Result<()> {
        if value.dims() != self.value.dims() {
            return Err(Error::InvalidConfig(format!(
                "{}: new value has shape {:?}, expected {:?}",
                self.key,
                value.dims(),
                self.value.dims()
            )));
        }
        self.value = value;
        Ok(())
    }
}

/// A projection's weight: a base tensor (which a method may substitute, as full fine-tuning
/// does), or frozen blocks of a quantized format.
enum ProjectionWeight {
    Dense(Param),
    Quantized {
        key: String,
        blocks: QuantizedWeight,
    },
}

impl ProjectionWeight {
    fn dims(&self) -> (usize, usize) {
        match self {
            Self::Dense(param) => param.value().dims2().unwrap_or((0, 0)),
            Self::Quantized { blocks, .. } => blocks.dims(),
        }
    }

    /// The dense weight as `hooks` resolve it; an error saying why for a quantized one.
    fn dense(&self, hooks: &dyn Hooks, what: &'static str) -> Result<Tensor> {
        match self {
            Self::Dense(param) => param.resolve(hooks),
            Self::Quantized { key, blocks } => Err(quantized_error(key, blocks, what)),
        }
    }
}

fn quantized_error(key: &str, blocks: &QuantizedWeight, what: &'static str) -> Error {
    Error::Quantized {
        key: key.to_string(),
        format: crate::quant::format_name(blocks.format()),
        what,
    }
}

/// A projection with a stable Hugging Face module name; a linear site for the hooks.
pub struct Linear {
    name: String,
    weight: ProjectionWeight,
    bias: Option<Param>,
    layer: Option<usize>,
}

impl Linear {
    /// Loads `{name}.weight` (`[out, in]`, kept quantized if the weights hold it so) and, if
    /// `with_bias`, `{name}.bias`; the site is named by the canonical key (`bert.` + `name`).
    pub fn load(
        weights: &Weights,
        name: &str,
        in_features: usize,
        out_features: usize,
        with_bias: bool,
        layer: Option<usize>,
    ) -> Result<Self> {
        let weight_name = format!("{name}.weight");
        let weight = match weights.quantized(&weight_name, &[out_features, in_features])? {
            Some(blocks) => ProjectionWeight::Quantized {
                key: weights.canonical(&weight_name),
                blocks: blocks.clone(),
            },
            None => ProjectionWeight::Dense(Param::load(
                weights,
                &weight_name,
                &[out_features, in_features],
            )?),
        };
        let bias = if with_bias {
            Some(Param::load(
                weights,
                &format!("{name}.bias"),
                &[out_features],
            )?)
        } else {
            None
        };
        Ok(Self {
            name: weights.canonical(name),
            weight,
            bias,
            layer,
        })
    }

    pub fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        enum Resolved<'a> {
            Dense(Tensor),
            Quantized(&'a QuantizedWeight),
        }
        let bias = self.bias.as_ref().map(|b| b.resolve(hooks)).transpose()?;
        let resolved = match &self.weight {
            ProjectionWeight::Dense(param) => Resolved::Dense(param.resolve(hooks)?),
            ProjectionWeight::Quantized { key, blocks } => {
                if hooks.parameter(key).is_some() {
                    return Err(quantized_error(key, blocks, "trained"));
                }
                Resolved::Quantized(blocks)
            }
        };
        let (out_features, in_features) = self.weight.dims();
        let site = LinearSite {
            name: &self.name,
            out_features,
            in_features,
            weight: match &resolved {
                Resolved::Dense(weight) => Some(weight),
                Resolved::Quantized(_) => None,
            },
            bias: bias.as_ref(),
        };
        let replaced = hooks.linear_input(&site, x)?;
        let update = hooks.low_rank(&site, x)?;
        let input = replaced.as_ref().unwrap_or(x);
        let base = match &resolved {
            Resolved::Dense(weight) => match (&replaced, &update) {
                // One node with the update inside; a trained weight (full fine-tuning) gets its
                // gradient, a frozen one costs none.
                (None, Some(update)) => {
                    let out = ops::linear_low_rank(x, weight, bias.as_ref(), update)?;
                    return Ok(hooks.linear(&site, x, out)?);
                }
                _ => ops::linear(input, weight, bias.as_ref())?,
            },
            Resolved::Quantized(blocks) => match (&replaced, &update) {
                (None, Some(update)) => {
                    let out = ops::quantized_linear_low_rank(x, blocks, bias.as_ref(), update)?;
                    return Ok(hooks.linear(&site, x, out)?);
                }
                _ => {
                    let product = ops::quantized_linear(input, blocks)?;
                    match &bias {
                        Some(b) => product.broadcast_add(b)?,
                        None => product,
                    }
                }
            },
        };
        let out = match &update {
            // The update reads the site's input as it was before the replacement.
            Some(update) => (base + ops::low_rank_delta(x, update)?)?,
            None => base,
        };
        Ok(hooks.linear(&site, x, out)?)
    }

    pub fn info(&self) -> SiteInfo {
        let (out_features, in_features) = self.weight.dims();
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

    /// The dense base weight; an error for a quantized one, which cannot be merged into.
    pub fn weight(&self) -> Result<&Tensor> {
        match &self.weight {
            ProjectionWeight::Dense(param) => Ok(param.value()),
            ProjectionWeight::Quantized { key, blocks } => {
                Err(quantized_error(key, blocks, "merged into"))
            }
        }
    }

    /// The quantized blocks of the weight, if it is kept quantized, under its key.
    pub fn quantized(&self) -> Option<(&str, &QuantizedWeight)> {
        match &self.weight {
            ProjectionWeight::Quantized { key, blocks } => Some((key, blocks)),
            ProjectionWeight::Dense(_) => None,
        }
    }

    /// Replaces the weight (merging an adapter in or out); the shape must not change.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        match &mut self.weight {
            ProjectionWeight::Dense(param) => param.set(weight),
            ProjectionWeight::Quantized { key, blocks } => {
                Err(quantized_error(key, blocks, "merged into"))
            }
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(Param::value)
    }

    /// Replaces the bias (merging an output-rescaling adapter); the site must have one.
    pub fn set_bias(&mut self, bias: Tensor) -> Result<()> {
        match &mut self.bias {
            Some(b) => b.set(bias),
            None => Err(Error::InvalidConfig(format!("{} has no bias", self.name))),
        }
    }

    /// The dense base tensors (a quantized weight is not one: see [`Linear::quantized`]).
    pub fn params(&self) -> impl Iterator<Item = &Param> {
        let weight = match &self.weight {
            ProjectionWeight::Dense(param) => Some(param),
            ProjectionWeight::Quantized { .. } => None,
        };
        weight.into_iter().chain(self.bias.as_ref())
    }

    /// The weight and bias as `hooks` resolve them (a method's substitutes, else the base),
    /// for fused blocks; an error for a quantized weight.
    pub fn resolved(&self, hooks: &dyn Hooks) -> Result<(Tensor, Option<Tensor>)> {
        Ok((
            self.weight.dense(hooks, "fused with its neighbours")?,
            self.bias.as_ref().map(|b| b.resolve(hooks)).transpose()?,
        ))
    }
}

/// A model whose linear sites can be reached by name (to merge adapters into them).
pub trait LinearSites {
    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear>;
}

/// Layer normalisation with a backward (see [`ops::layer_norm`]).
pub struct LayerNorm {
    gamma: Param,
    beta: Param,
    eps: f64,
}

impl LayerNorm {
    pub fn load(weights: &Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gamma: Param::load(weights, &format!("{name}.weight"), &[size])?,
            beta: Param::load(weights, &format!("{name}.bias"), &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        Ok(ops::layer_norm(
            x,
            &self.gamma.resolve(hooks)?,
            &self.beta.resolve(hooks)?,
            self.eps,
        )?)
    }

    pub fn params(&self) -> [&Param; 2] {
        [&self.gamma, &self.beta]
    }

    /// `(gamma, beta)` as `hooks` resolve them.
    pub fn resolved(&self, hooks: &dyn Hooks) -> Result<(Tensor, Tensor)> {
        Ok((self.gamma.resolve(hooks)?, self.beta.resolve(hooks)?))
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

/// RMS normalisation with a backward (see [`ops::rms_norm`]).
pub struct RmsNorm {
    weight: Param,
    eps: f64,
}

impl RmsNorm {
    pub fn load(weights: &Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Param::load(weights, &format!("{name}.weight"), &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, hooks: &dyn Hooks) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.weight.resolve(hooks)?, self.eps)?)
    }

    pub fn params(&self) -> [&Param; 1] {
        [&self.weight]
    }
}

/// A trainable classification head `[num_labels, hidden]` (PEFT's modules_to_save), with a
/// bias for BERT's `classifier`, without one for decoders' `score`.
pub struct ClassifierHead {
    weight: Var,
    bias: Option<Var>,
}

impl ClassifierHead {
    /// A head from its initial tensors, kept in f32 when they are half precision (a trained
    /// tensor stays f32 on a bf16 base).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let trainable = |t: &Tensor| -> Result<Var> {
            Ok(Var::from_tensor(
                &t.to_dtype(ops::compute_dtype(t.dtype()))?,
            )?)
        };
        Ok(Self {
            weight: trainable(&weight)?,
            bias: bias.as_ref().map(trainable).transpose()?,
        })
    }

    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(
            pooled,
            self.weight.as_tensor(),
            self.bias.as_ref().map(Var::as_tensor),
        )?)
    }

    /// The head's tensors under their module-relative names (`weight`, `bias`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut vars = vec![("weight".to_string(), self.weight.clone())];
        vars.extend(self.bias.iter().map(|b| ("bias".to_string(), b.clone())));
        vars
    }

    pub fn device(&self) -> &candle_core::Device {
        self.weight.device()
    }

    /// Sets the head from saved tensors (by module-relative name), checking that exactly its
    /// tensors are there with their shapes.
    pub fn load_from(&self, saved: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        for (what, var) in self.vars() {
            let value = saved.get(&what).ok_or_else(|| {
                Error::InvalidConfig(format!("the saved classifier head has no `{what}`"))
            })?;
            if var.dims() != value.dims() {
                return Err(Error::InvalidConfig(format!(
                    "the classifier's {what} has shape {:?}, the model's head expects {:?}",
                    value.dims(),
                    var.dims()
                )));
            }
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        if let Some(extra) = saved
            .keys()
            .find(|k| !self.vars().iter().any(|(n, _)| n == *k))
        {
            return Err(Error::InvalidConfig(format!(
                "the saved classifier head has `{extra}`, which this model's head does not"
            )));
        }
        Ok(())
    }
}
