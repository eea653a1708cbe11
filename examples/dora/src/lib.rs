//! DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") as Hugging Face PEFT defines
//! it (LoRA with `use_dora: true`), as an out-of-tree graft plugin.
//!
//! The adapted weight is `W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖`, the norm taken over each output
//! row and detached from the graph (the paper's section 4.3, as PEFT does); `m` starts at `‖W‖`,
//! B at zero, so training starts from the base model. In the forward this is
//! `y = b + g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ)` with `g = m / ‖W + s·B·A‖`.
use graft_peft::candle::{Result as CandleResult, Tensor, Var, D};
use graft_peft::graft_model::init;
use graft_peft::graft_model::{Hooks, LinearSite};
use graft_peft::serde::Deserialize;
use graft_peft::serde_json::{json, Map, Value};
use graft_peft::{
    SiteLayers,
    adapter, config, Adapter, AttachContext, MergeDelta, PluginMethod, Saved, Result, TargetModules,
};
use std::collections::{BTreeMap, HashMap};

const NAME: &str = "dora";

/// PEFT's LoraConfig fields that DoRA uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "graft_peft::serde")]
pub struct DoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Let gradients flow through the row norms too (the exact derivative of the forward).
    /// Off by default: PEFT and the paper treat the norm as a constant to save memory. On, a
    /// finite-difference check can verify the whole graph. Training only; not saved.
    #[serde(default)]
    pub norm_gradient: bool,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_targets() -> TargetModules {
    TargetModules::Names(vec!["query".into(), "value".into()])
}

impl DoraConfig {
    fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }
}

graft_peft::plugin!(Dora, NAME, "LORA");

fn keys(site: &str) -> [String; 3] {
    [
        format!("base_model.model.{site}.lora_A.weight"),
        format!("base_model.model.{site}.lora_B.weight"),
        // PEFT strips the `.weight` of the magnitude's module when saving.
        format!("base_model.model.{site}.lora_magnitude_vector"),
    ]
}

/// One site: LoRA's factors, the magnitude, and the frozen weight and bias it rescales.
pub struct DoraLayer {
    pub a: Var,
    pub b: Var,
    pub magnitude: Var,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub scale: f64,
    pub norm_gradient: bool,
}

impl DoraLayer {
    /// `W + s·B·A`, `[out, in]`.
    fn adapted_weight(&self) -> CandleResult<Tensor> {
        let ba = self.b.as_tensor().matmul(self.a.as_tensor())?;
        self.weight.broadcast_add(&(ba * self.scale)?)
    }

    /// `m / ‖W + s·B·A‖` per output row, the norm detached unless `norm_gradient`.
    fn gain(&self) -> CandleResult<Tensor> {
        let norm = self.adapted_weight()?.sqr()?.sum(D::Minus1)?.sqrt()?;
        let norm = if self.norm_gradient {
            norm
        } else {
            norm.detach()
        };
        self.magnitude.as_tensor().div(&norm)
    }

    pub fn forward(&self, x: &Tensor, base: Tensor) -> CandleResult<Tensor> {
        let a = self.a.as_tensor();
        let b = self.b.as_tensor();
        let lora = (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * self.scale)?;
        let without_bias = match &self.bias {
            Some(bias) => base.broadcast_sub(bias)?,
            None => base,
        };
        let scaled = (without_bias + lora)?.broadcast_mul(&self.gain()?)?;
        match &self.bias {
            Some(bias) => scaled.broadcast_add(bias),
            None => Ok(scaled),
        }
    }

    /// `W' - W` with `W' = g ⊙ (W + s·B·A)`.
    pub fn delta_weight(&self) -> CandleResult<Tensor> {
        let merged = self
            .adapted_weight()?
            .broadcast_mul(&self.gain()?.unsqueeze(1)?)?;
        merged - &self.weight
    }
}

impl PluginMethod for Dora {
    fn create(&self, settings: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let settings: DoraConfig = config::parse(NAME, settings)?;
        config::refuse_unknown(
            NAME,
            &settings.other,
            &[],
            "r, lora_alpha, target_modules, norm_gradient",
        )?;
        if settings.r == 0 {
            return Err(config::invalid(NAME, "r must be at least 1, found 0"));
        }
        let mut rng = init::seeded_rng(ctx.seed);
        let mut layers = BTreeMap::new();
        for site in settings.target_modules.select(NAME, ctx.sites)? {
            let (weight, bias) = base(ctx, &site.name)?;
            let bound = init::kaiming_uniform_bound(site.in_features);
            let a = init::uniform(
                &mut rng,
                &[settings.r, site.in_features],
                bound,
                ctx.dtype,
                ctx.device,
            )?;
            let b = Tensor::zeros((site.out_features, settings.r), ctx.dtype, ctx.device)?;
            let magnitude = weight.sqr()?.sum(D::Minus1)?.sqrt()?;
            let parts = (a, b, magnitude, weight, bias);
            layers.insert(site.name.clone(), layer(parts, &settings)?);
        }
        Ok(Box::new(DoraAdapter {
            settings,
            layers: SiteLayers::new(layers),
        }))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let settings: DoraConfig = config::parse(NAME, saved.config)?;
        if settings.other.get("use_dora") != Some(&Value::Bool(true)) {
            return Err(config::invalid(
                NAME,
                "adapter_config.json lacks `use_dora: true`: not a DoRA adapter",
            ));
        }
        let mut layers = BTreeMap::new();
        for site in settings.target_modules.select(NAME, ctx.sites)? {
            let (weight, bias) = base(ctx, &site.name)?;
            let [ka, kb, km] = keys(&site.name);
            let a = saved.tensor(&ka, &[settings.r, site.in_features])?;
            let b = saved.tensor(&kb, &[site.out_features, settings.r])?;
            let m = saved.tensor(&km, &[site.out_features])?;
            let parts = (
                a.to_dtype(ctx.dtype)?,
                b.to_dtype(ctx.dtype)?,
                m.to_dtype(ctx.dtype)?,
                weight,
                bias,
            );
            layers.insert(site.name.clone(), layer(parts, &settings)?);
        }
        Ok(Box::new(DoraAdapter {
            settings,
            layers: SiteLayers::new(layers),
        }))
    }
}

fn base(ctx: &AttachContext, site: &str) -> Result<(Tensor, Option<Tensor>)> {
    let weight = ctx
        .base_tensor(&format!("{site}.weight"))?
        .to_dtype(ctx.dtype)?;
    let bias = match ctx.base_tensor(&format!("{site}.bias")) {
        Ok(b) => Some(b.to_dtype(ctx.dtype)?),
        Err(_) => None,
    };
    Ok((weight, bias))
}

/// A, B, magnitude, frozen weight, frozen bias.
type Parts = (Tensor, Tensor, Tensor, Tensor, Option<Tensor>);

fn layer((a, b, m, weight, bias): Parts, settings: &DoraConfig) -> Result<DoraLayer> {
    Ok(DoraLayer {
        a: Var::from_tensor(&a)?,
        b: Var::from_tensor(&b)?,
        magnitude: Var::from_tensor(&m)?,
        weight,
        bias,
        scale: settings.scale(),
        norm_gradient: settings.norm_gradient,
    })
}

pub struct DoraAdapter {
    settings: DoraConfig,
    layers: SiteLayers<DoraLayer>,
}

impl Hooks for DoraAdapter {
    fn linear(&self, site: &LinearSite<'_>, x: &Tensor, base: Tensor) -> CandleResult<Tensor> {
        match self.layers.get(site.name) {
            Some(layer) => layer.forward(x, base),
            None => Ok(base),
        }
    }
}

impl Adapter for DoraAdapter {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|(site, l)| {
                let [ka, kb, km] = keys(site);
                [
                    (ka, l.a.clone()),
                    (kb, l.b.clone()),
                    (km, l.magnitude.clone()),
                ]
            })
            .collect()
    }

    fn config_json(&self) -> Value {
        json!({
            "r": self.settings.r,
            "lora_alpha": self.settings.lora_alpha,
            "lora_dropout": 0.0,
            "target_modules": self.settings.target_modules.to_json(),
            "use_dora": true,
            "use_rslora": false,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
        })
    }

    fn merge_deltas(&self) -> Result<Option<Vec<MergeDelta>>> {
        self.layers
            .merge_deltas(|layer| Ok((layer.delta_weight()?, None)))
    }
}
