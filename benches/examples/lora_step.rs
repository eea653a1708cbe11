//! A MiniLM LoRA training step (8 x 128 tokens, r = 8 on query and value), forward and backward
//! timed separately, fused and composed on alternating steps, so that the machine's drift hits
//! both alike. Fused: the update inside the frozen projection (`Hooks::low_rank`) and each
//! feed-forward block as one node (`Hooks::acts_on`). Composed: the update added by
//! `Hooks::linear` and every op its own graph node.
//!
//! `cargo run --release -p graft-benches --example lora_step -- MODEL_DIR [STEPS]`
use candle_core::{DType, Device, Tensor, Var};
use graft_benches::{inputs, median, minilm};
use graft_model::ops::low_rank_delta;
use graft_model::{init, Acts, Hooks, LinearSite, LowRank};
use std::cell::Cell;
use std::collections::HashMap;
use std::time::Instant;

struct Lora {
    sites: HashMap<String, (Var, Var)>,
    fused: Cell<bool>,
}

impl Lora {
    fn update(&self, site: &str) -> candle_core::Result<Option<LowRank>> {
        self.sites
            .get(site)
            .map(|(a, b)| {
                Ok(LowRank {
                    a: a.as_tensor().clone(),
                    b: (b.as_tensor() * 2.0)?,
                    input_mask: None,
                })
            })
            .transpose()
    }
}

impl Hooks for Lora {
    /// Composed, every site runs op by op; fused, the feed-forward blocks run as one node.
    fn acts_on(&self, site: &str) -> Acts {
        match (self.fused.get(), self.sites.contains_key(site)) {
            (false, _) => Acts::Any,
            (true, true) => Acts::LowRankOnly,
            (true, false) => Acts::Not,
        }
    }

    fn low_rank(&self, site: &LinearSite<'_>, _x: &Tensor) -> candle_core::Result<Option<LowRank>> {
        if self.fused.get() {
            self.update(site.name)
        } else {
            Ok(None)
        }
    }

    fn linear(
        &self,
        site: &LinearSite<'_>,
        x: &Tensor,
        base: Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.update(site.name)? {
            Some(update) if !self.fused.get() => base + low_rank_delta(x, &update)?,
            _ => Ok(base),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    graft_model::runtime::init();
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: lora_step MODEL_DIR [STEPS]")?;
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let model = minilm(&dir)?;
    let mut rng = init::seeded_rng(0);
    let mut sites = HashMap::new();
    for site in model.bert.sites() {
        if site.name.ends_with(".query") || site.name.ends_with(".value") {
            let a = init::normal(
                &mut rng,
                &[8, site.in_features],
                0.05,
                DType::F32,
                &Device::Cpu,
            )?;
            let b = init::normal(
                &mut rng,
                &[site.out_features, 8],
                0.05,
                DType::F32,
                &Device::Cpu,
            )?;
            sites.insert(site.name, (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
        }
    }
    let lora = Lora {
        sites,
        fused: Cell::new(false),
    };
    let inputs = inputs(8, 128)?;
    let labels = Tensor::from_vec(vec![0u32, 1, 0, 1, 1, 0, 1, 0], 8, &Device::Cpu)?;
    let mut times: HashMap<(bool, &str), Vec<f64>> = HashMap::new();
    for step in 0..2 * (steps + 1) {
        let fused = step % 2 == 1;
        lora.fused.set(fused);
        let started = Instant::now();
        let logits = model.forward(&inputs, &lora)?;
        let loss = graft_model::loss::cross_entropy(&logits, &labels)?;
        let forward = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let grads = loss.backward()?;
        let backward = started.elapsed().as_secs_f64();
        assert!(lora
            .sites
            .values()
            .all(|(a, _)| grads.get(a.as_tensor()).is_some()));
        if step >= 2 {
            times.entry((fused, "forward")).or_default().push(forward);
            times.entry((fused, "backward")).or_default().push(backward);
        }
    }
    for fused in [false, true] {
        let label = if fused { "fused   " } else { "composed" };
        let f = median(times[&(fused, "forward")].clone());
        let b = median(times[&(fused, "backward")].clone());
        println!(
            "{label}: forward {f:.4} s, backward {b:.4} s, step {:.4} s (medians of {steps})",
            f + b
        );
    }
    Ok(())
}
