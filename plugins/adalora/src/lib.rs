//! AdaLoRA (Zhang et al. 2023) as Hugging Face PEFT defines it, as a graft plugin.
//!
//! Same shape as every method crate: `config.rs` (PEFT's fields), `layer.rs` (the math of one
//! site), `allocator.rs` (PEFT's RankAllocator), this file (the glue to graft-peft's traits).
//! Ranks are pruned during training by zeroing entries of E, as PEFT does; saving truncates
//! every site to its kept ranks and writes `rank_pattern`.
mod allocator;
mod config;
mod layer;

pub use allocator::{keep_top, Importance, Schedule};
pub use config::AdaLoraConfig;
pub use layer::{orth_penalty, AdaLoraLayer};

use config::invalid;
use graft_peft::candle::backprop::GradStore;
use graft_peft::candle::{Device, Tensor, Var};
use graft_peft::graft_model::init::{self, Dropout};
use graft_peft::graft_model::SiteInfo;
use graft_peft::serde_json::Value;
use graft_peft::{
    adapter, Adapter, AttachContext, MergeDelta, PluginMethod, Result, Saved, SiteLayers,
};
use std::collections::{BTreeMap, HashMap};

graft_peft::plugin!(AdaLora, "adalora", "ADALORA");

/// PEFT stores AdaLoRA's factors as a ParameterDict: no `.weight` suffix.
fn key(site: &str, part: &str) -> String {
    format!("base_model.model.{site}.{part}")
}

fn keys(site: &str) -> [String; 3] {
    ["lora_A", "lora_E", "lora_B"].map(|part| key(site, part))
}

impl PluginMethod for AdaLora {
    /// configs/adalora.toml, the recipe `cargo xtask train --method adalora` documents.
    fn recommended_config(&self) -> Option<&'static str> {
        Some(include_str!("../../../configs/adalora.toml"))
    }

    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = AdaLoraConfig::from_train_config(
            &graft_peft::config::with_query_value_targets(config, "adalora", ctx)?,
        )?;
        let total_step = config.resolve_total_step(ctx.total_steps)?;
        let mut rng = init::seeded_rng(ctx.seed);
        let mut layers = BTreeMap::new();
        let r = config.init_r;
        for site in config
            .low_rank
            .target_modules
            .select("adalora", ctx.sites)?
        {
            let a = init::normal(
                &mut rng,
                &[r, site.in_features],
                0.02,
                ctx.dtype,
                ctx.device,
            )?;
            let e = Tensor::zeros((r, 1), ctx.dtype, ctx.device)?;
            let b = init::normal(
                &mut rng,
                &[site.out_features, r],
                0.02,
                ctx.dtype,
                ctx.device,
            )?;
            layers.insert(
                site.name.clone(),
                AdaLoraLayer::new([a, e, b], config.scale())?,
            );
        }
        Ok(Box::new(AdaLoraAdapter::new(
            config,
            layers,
            Some(total_step),
            None,
            ctx.seed,
        )))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = AdaLoraConfig::from_adapter_config(
            &graft_peft::config::with_query_value_targets(saved.config, "adalora", ctx)?,
        )?;
        let mut layers = BTreeMap::new();
        let mut pattern = BTreeMap::new();
        for site in config
            .low_rank
            .target_modules
            .select("adalora", ctx.sites)?
        {
            let [mut a, mut e, mut b] = load_site(&config, site, saved.tensors)?;
            if let Some(kept) = saved_pattern(&config, &site.name) {
                [a, e, b] = pad_to_pattern([a, e, b], kept, &site.name)?;
                pattern.insert(site.name.clone(), kept.clone());
            }
            let layer = AdaLoraLayer::new(
                [
                    a.to_dtype(ctx.dtype)?,
                    e.to_dtype(ctx.dtype)?,
                    b.to_dtype(ctx.dtype)?,
                ],
                config.scale(),
            )?;
            layers.insert(site.name.clone(), layer);
        }
        let total_step = config
            .total_step
            .or((ctx.total_steps > 0).then_some(ctx.total_steps));
        let pattern = (!pattern.is_empty()).then_some(pattern);
        Ok(Box::new(AdaLoraAdapter::new(
            config, layers, total_step, pattern, ctx.seed,
        )))
    }
}

/// A site's saved A, E, B; their rank is read from A (pruned sites have fewer than `init_r`).
fn load_site(
    config: &AdaLoraConfig,
    site: &SiteInfo,
    tensors: &HashMap<String, Tensor>,
) -> Result<[Tensor; 3]> {
    let [ka, ke, kb] = keys(&site.name);
    let rank = match tensors.get(&ka) {
        Some(a) if a.rank() == 2 && a.dims()[0] <= config.init_r => a.dims()[0],
        _ => config.init_r,
    };
    Ok([
        adapter::take_tensor(tensors, &ka, &[rank, site.in_features])?,
        adapter::take_tensor(tensors, &ke, &[rank, 1])?,
        adapter::take_tensor(tensors, &kb, &[site.out_features, rank])?,
    ])
}

/// The saved config's pattern of `site`: `{site}.lora_E`, or with PEFT's adapter-name suffix.
fn saved_pattern<'a>(config: &'a AdaLoraConfig, site: &str) -> Option<&'a Vec<bool>> {
    let name = format!("{site}.lora_E");
    let patterns = config.rank_pattern.as_ref()?;
    patterns.get(&name).or_else(|| {
        patterns
            .iter()
            .find(|(k, _)| k.strip_prefix(&name).is_some_and(|s| s.starts_with('.')))
            .map(|(_, v)| v)
    })
}

/// A truncated site's A, E, B back at the pattern's full rank, zeros at the pruned indices.
///
/// The forward and the merged delta are PEFT's truncated ones exactly (a pruned triplet adds
/// ±0), and the computation has the shapes training had, so a reloaded adapter reproduces the
/// trained one's logits bit for bit. Saving truncates again.
fn pad_to_pattern([a, e, b]: [Tensor; 3], kept: &[bool], site: &str) -> Result<[Tensor; 3]> {
    let rank = a.dims()[0];
    let count = kept.iter().filter(|&&k| k).count();
    if count != rank {
        return Err(invalid(format!(
            "rank_pattern of {site} keeps {count} of {} ranks, but its tensors have rank {rank}",
            kept.len()
        )));
    }
    // Index `rank` is an appended zero row (column of B).
    let mut next = 0u32;
    let index: Vec<u32> = kept
        .iter()
        .map(|&k| {
            next += k as u32;
            if k {
                next - 1
            } else {
                rank as u32
            }
        })
        .collect();
    let index = Tensor::from_vec(index, kept.len(), a.device())?;
    let pad = |t: &Tensor, dim: usize| -> Result<Tensor> {
        let mut dims = t.dims().to_vec();
        dims[dim] = 1;
        let zero = Tensor::zeros(dims, t.dtype(), t.device())?;
        Ok(Tensor::cat(&[t, &zero], dim)?.index_select(&index, dim)?)
    };
    Ok([pad(&a, 0)?, pad(&e, 0)?, pad(&b, 1)?])
}

pub struct AdaLoraAdapter {
    config: AdaLoraConfig,
    layers: SiteLayers<AdaLoraLayer>,
    /// The schedule's length; `None` for a loaded adapter whose config has none.
    total_step: Option<usize>,
    importance: Importance,
    /// Per site, which rank indices survive the last allocation.
    rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
    dropout: Dropout,
}

impl AdaLoraAdapter {
    fn new(
        config: AdaLoraConfig,
        layers: BTreeMap<String, AdaLoraLayer>,
        total_step: Option<usize>,
        rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
        seed: u64,
    ) -> Self {
        Self {
            dropout: Dropout::new(config.low_rank.lora_dropout, seed ^ 0x00ad_a104),
            importance: Importance::new(config.beta1, config.beta2),
            config,
            layers: SiteLayers::new(layers),
            total_step,
            rank_pattern,
        }
    }

    pub fn layers(&self) -> &BTreeMap<String, AdaLoraLayer> {
        &self.layers
    }

    /// Per site, the rank indices the last allocation kept (`None` before the first).
    pub fn rank_pattern(&self) -> Option<&BTreeMap<String, Vec<bool>>> {
        self.rank_pattern.as_ref()
    }

    /// The site's pruned-rank mask, `None` when every rank is kept.
    fn site_mask(&self, site: &str, rank: usize) -> Result<Option<&[bool]>> {
        let Some(kept) = self.rank_pattern.as_ref().and_then(|p| p.get(site)) else {
            return Ok(None);
        };
        if kept.len() != rank {
            return Err(invalid(format!(
                "rank_pattern of {site} has {} entries, but the site has rank {rank}",
                kept.len()
            )));
        }
        Ok((!kept.iter().all(|&k| k)).then_some(kept.as_slice()))
    }

    fn schedule(&self, total_step: usize) -> Schedule {
        let n = self.layers.len();
        Schedule {
            init_bgt: self.config.init_r * n,
            target_bgt: self.config.target_r * n,
            tinit: self.config.tinit,
            tfinal: self.config.tfinal,
            total_step,
            delta_t: self.config.delta_t,
        }
    }

    fn update_importance(&mut self, grads: &GradStore) -> Result<()> {
        for (site, layer) in &self.layers {
            for (k, var) in keys(site).iter().zip([&layer.a, &layer.e, &layer.b]) {
                let p = var.as_tensor();
                self.importance.update(k, p, grads.get(p))?;
            }
        }
        Ok(())
    }

    /// Zeroes E outside the `budget` best triplets (over all sites) and records the pattern.
    fn mask_to_budget(&mut self, budget: usize) -> Result<()> {
        let mut scores = Vec::with_capacity(self.layers.len());
        for (site, layer) in &self.layers {
            let [a, e, b] = keys(site);
            scores.push(self.importance.triplet_scores([&a, &e, &b], layer.rank())?);
        }
        let kept = keep_top(&scores, budget);
        let mut pattern = BTreeMap::new();
        for ((site, layer), kept) in self.layers.iter().zip(kept) {
            zero_pruned(&layer.e, &kept)?;
            pattern.insert(site.clone(), kept);
        }
        self.rank_pattern = Some(pattern);
        Ok(())
    }
}

/// Sets the entries of E whose triplet is not kept to 0, in place.
fn zero_pruned(e: &Var, kept: &[bool]) -> Result<()> {
    let values: Vec<f64> = kept.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(values, (kept.len(), 1), e.device())?.to_dtype(e.dtype())?;
    Ok(e.set(&e.as_tensor().detach().mul(&mask)?)?)
}

graft_peft::low_rank_hooks!(AdaLoraAdapter);

impl Adapter for AdaLoraAdapter {
    /// The full-size factors (pruning zeroes E in place; saving truncates).
    fn trainable(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|(site, l)| keys(site).into_iter().zip([&l.a, &l.e, &l.b]))
            .map(|(k, v)| (k, v.clone()))
            .collect()
    }

    fn dropout(&self) -> Option<&Dropout> {
        Some(&self.dropout)
    }

    /// Dropout position, smoothed importance and the current rank pattern.
    fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = vec![self.dropout.state()?];
        state.extend(self.importance.state());
        for (site, kept) in self.rank_pattern.iter().flatten() {
            let bits: Vec<u8> = kept.iter().map(|&k| u8::from(k)).collect();
            state.push((
                format!("rank_pattern.{site}"),
                Tensor::from_vec(bits, kept.len(), &Device::Cpu)?,
            ));
        }
        Ok(state)
    }

    fn restore_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.dropout.restore(state)?;
        self.importance.restore(state)?;
        let mut pattern = BTreeMap::new();
        for (name, bits) in state {
            if let Some(site) = name.strip_prefix("rank_pattern.") {
                let bits = bits.to_vec1::<u8>()?;
                pattern.insert(site.to_string(), bits.iter().map(|&b| b == 1).collect());
            }
        }
        if !pattern.is_empty() {
            self.rank_pattern = Some(pattern);
        }
        Ok(())
    }

    fn extra_loss(&self) -> Result<Option<Tensor>> {
        let mut squares = Vec::with_capacity(2 * self.layers.len());
        for layer in self.layers.values() {
            squares.extend(layer.orth_squares()?);
        }
        Ok(orth_penalty(&squares, self.config.orth_reg_weight)?)
    }

    /// PEFT's `update_and_allocate`: before `total_step - tfinal`, smooth the importance and
    /// prune to the scheduled budget on pruning steps; at it, prune to the final budget (with
    /// the importance as of the step before, as PEFT does) and forget the importance; after
    /// it, re-apply the final pattern.
    fn after_step(&mut self, step: usize, grads: &GradStore) -> Result<()> {
        let total_step = self
            .total_step
            .ok_or_else(|| invalid("total_step is unknown, so ranks cannot be allocated".into()))?;
        let end = total_step.saturating_sub(self.config.tfinal);
        let schedule = self.schedule(total_step);
        if step < end {
            self.update_importance(grads)?;
            let (budget, prune) = schedule.budget(step);
            if prune {
                self.mask_to_budget(budget)?;
            }
        } else if step == end {
            self.mask_to_budget(schedule.budget(step).0)?;
            self.importance.reset();
        } else {
            for (site, layer) in &self.layers {
                if let Some(kept) = self.site_mask(site, layer.rank())? {
                    zero_pruned(&layer.e, kept)?;
                }
            }
        }
        Ok(())
    }

    fn config_json(&self) -> Value {
        let pattern = self.rank_pattern.as_ref().map(|p| {
            p.iter()
                .map(|(site, kept)| (format!("{site}.lora_E"), Value::from(kept.clone())))
                .collect::<serde_json::Map<_, _>>()
                .into()
        });
        self.config.to_json(self.total_step, pattern)
    }

    /// Every site truncated to its kept ranks (A's rows, E's rows, B's columns), as PEFT's
    /// `resize_state_dict_by_rank_pattern` saves them.
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(3 * self.layers.len());
        for (site, layer) in &self.layers {
            let [ka, ke, kb] = keys(site);
            let (a, e, b) = (
                layer.a.as_tensor(),
                layer.e.as_tensor(),
                layer.b.as_tensor(),
            );
            let kept = self.site_mask(site, layer.rank())?;
            let [a, e, b] = match kept {
                None => [a.clone(), e.clone(), b.clone()],
                Some(kept) => {
                    let index: Vec<u32> = (0..kept.len() as u32)
                        .filter(|&i| kept[i as usize])
                        .collect();
                    let index = Tensor::from_vec(index.clone(), index.len(), a.device())?;
                    [
                        a.index_select(&index, 0)?,
                        e.index_select(&index, 0)?,
                        b.index_select(&index, 1)?,
                    ]
                }
            };
            out.extend([(ka, a), (ke, e), (kb, b)]);
        }
        Ok(out)
    }

    fn merge_deltas(&self) -> Result<Option<Vec<MergeDelta>>> {
        self.layers
            .merge_deltas(|layer| Ok((layer.delta_weight()?, None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_peft::adapter::SavedAdapter;
    use graft_peft::candle::DType;
    use graft_peft::graft_model::LinearSite;
    use graft_peft::graft_model::{ops, ModelInfo};
    use serde_json::json;

    fn sites() -> Vec<SiteInfo> {
        ["m.0.query", "m.0.value"]
            .map(|name| SiteInfo {
                name: name.into(),
                in_features: 6,
                out_features: 5,
                layer: Some(0),
            })
            .to_vec()
    }

    fn with_ctx<T>(f: impl FnOnce(&AttachContext) -> T) -> T {
        let info = ModelInfo {
            model_type: "bert".into(),
            hidden_size: 6,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 6,
            vocab_size: 10,
            word_embeddings: "emb".into(),
        };
        let sites = sites();
        let tokenize = |_: &str| -> Result<Vec<u32>> { Ok(vec![]) };
        f(&AttachContext {
            info: &info,
            sites: &sites,
            dtype: DType::F64,
            device: &Device::Cpu,
            seed: 0,
            base_tensors: &[],
            quantized: &[],
            tokenize: &tokenize,
            total_steps: 0,
        })
    }

    fn output(adapter: &dyn Adapter, site: &str, x: &Tensor, w: &Tensor) -> Tensor {
        let (out_features, in_features) = w.dims2().unwrap();
        let linear = LinearSite {
            name: site,
            out_features,
            in_features,
            weight: Some(w),
            bias: None,
        };
        let out = match adapter.low_rank(&linear, x).unwrap() {
            Some(update) => ops::linear_low_rank(x, w, None, &update),
            None => ops::linear(x, w, None),
        };
        adapter.linear(&linear, x, out.unwrap()).unwrap()
    }

    #[test]
    fn pruned_sites_save_truncated_and_reload_padded_to_the_same_outputs() {
        let config =
            AdaLoraConfig::from_train_config(&json!({ "init_r": 3, "target_r": 1 })).unwrap();
        let mut rng = init::seeded_rng(5);
        let mut random =
            |shape: &[usize]| init::normal(&mut rng, shape, 0.5, DType::F64, &Device::Cpu).unwrap();
        let mut layers = BTreeMap::new();
        for site in sites() {
            let tensors = [random(&[3, 6]), random(&[3, 1]), random(&[5, 3])];
            layers.insert(
                site.name,
                AdaLoraLayer::new(tensors, config.scale()).unwrap(),
            );
        }
        let mut trained = AdaLoraAdapter::new(config, layers, Some(10), None, 0);
        // query loses every triplet (rank 0), value its middle one.
        let pattern = BTreeMap::from([
            ("m.0.query".to_string(), vec![false; 3]),
            ("m.0.value".to_string(), vec![true, false, true]),
        ]);
        for (site, kept) in &pattern {
            zero_pruned(&trained.layers[site].e, kept).unwrap();
        }
        trained.rank_pattern = Some(pattern);

        let tensors = trained.tensors().unwrap();
        let dims = |key: &str| {
            tensors
                .iter()
                .find(|(k, _)| k == key)
                .unwrap()
                .1
                .dims()
                .to_vec()
        };
        assert_eq!(dims("base_model.model.m.0.query.lora_A"), [0, 6]);
        assert_eq!(dims("base_model.model.m.0.query.lora_B"), [5, 0]);
        assert_eq!(dims("base_model.model.m.0.value.lora_A"), [2, 6]);
        assert_eq!(dims("base_model.model.m.0.value.lora_E"), [2, 1]);
        assert_eq!(dims("base_model.model.m.0.value.lora_B"), [5, 2]);

        let dir = tempfile::tempdir().unwrap();
        adapter::save(dir.path(), &trained.config_json(), &tensors).unwrap();
        let saved = SavedAdapter::read(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(
            saved.config["rank_pattern"]["m.0.value.lora_E"],
            json!([true, false, true])
        );
        let loaded = with_ctx(|ctx| {
            AdaLora.load(
                &Saved {
                    config: &saved.config,
                    tensors: &saved.tensors,
                },
                ctx,
            )
        })
        .unwrap();

        let x = random(&[4, 6]);
        let w = random(&[5, 6]);
        for site in ["m.0.query", "m.0.value"] {
            let (before, after) = (
                output(&trained, site, &x, &w),
                output(&*loaded, site, &x, &w),
            );
            assert_eq!(
                before.to_vec2::<f64>().unwrap(),
                after.to_vec2::<f64>().unwrap()
            );
        }
        let deltas = |a: &dyn Adapter| a.merge_deltas().unwrap().unwrap();
        for (d1, d2) in deltas(&trained).iter().zip(deltas(&*loaded).iter()) {
            assert_eq!(d1.site, d2.site);
            assert_eq!(
                d1.weight.to_vec2::<f64>().unwrap(),
                d2.weight.to_vec2::<f64>().unwrap()
            );
        }
        // Saving again writes the same truncated tensors and pattern.
        assert_eq!(
            loaded.config_json()["rank_pattern"],
            trained.config_json()["rank_pattern"]
        );
        for (key, tensor) in loaded.tensors().unwrap() {
            let want = &saved.tensors[&key];
            assert_eq!(tensor.dims(), want.dims(), "{key}");
            let diff = (tensor - want).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0, "{key}");
        }
    }

    #[test]
    fn a_pattern_that_does_not_fit_the_tensors_is_refused() {
        let mut rng = init::seeded_rng(1);
        let mut random =
            |shape: &[usize]| init::normal(&mut rng, shape, 0.5, DType::F64, &Device::Cpu).unwrap();
        let mut tensors = HashMap::new();
        for site in ["m.0.query", "m.0.value"] {
            let [ka, ke, kb] = keys(site);
            tensors.insert(ka, random(&[2, 6]));
            tensors.insert(ke, random(&[2, 1]));
            tensors.insert(kb, random(&[5, 2]));
        }
        let config = json!({
            "init_r": 3,
            "rank_pattern": { "m.0.query.lora_E": [true, false, false] },
        });
        let err = with_ctx(|ctx| {
            AdaLora.load(
                &Saved {
                    config: &config,
                    tensors: &tensors,
                },
                ctx,
            )
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("keeps 1 of 3"), "{err}");
        // Without a pattern, the rank is read from the tensors.
        let loaded = with_ctx(|ctx| {
            let config = json!({ "init_r": 3 });
            AdaLora.load(
                &Saved {
                    config: &config,
                    tensors: &tensors,
                },
                ctx,
            )
        })
        .unwrap();
        assert_eq!(loaded.trainable()[0].1.dims(), [2, 6]);
    }

    #[test]
    fn config_errors_name_the_field() {
        let train = |v| {
            AdaLoraConfig::from_train_config(&v)
                .unwrap_err()
                .to_string()
        };
        assert!(train(json!({ "init_r": 0 })).contains("init_r must be at least 1"));
        assert!(train(json!({ "r": 4 })).contains("init_r"));
        assert!(train(json!({ "init_r": 4, "target_r": 6 })).contains("target_r"));
        assert!(train(json!({ "beta1": 1.0 })).contains("beta1"));
        assert!(train(json!({ "deltaT": 0 })).contains("deltaT"));
        assert!(train(json!({ "orth_reg_weight": 0.0 })).contains("orth_reg_weight"));
        let config = AdaLoraConfig::from_train_config(&json!({})).unwrap();
        assert_eq!((config.init_r, config.target_r, config.delta_t), (12, 8, 1));
        assert!(
            config.resolve_total_step(0).is_err(),
            "no total_step and no run length"
        );
        assert_eq!(config.resolve_total_step(150).unwrap(), 150);
        let err = AdaLoraConfig::from_adapter_config(&json!({ "bias": "all" })).unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
    }
}
