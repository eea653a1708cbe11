//! A method's state per targeted linear site, and what every site-wise method does with it:
//! say where it acts, look a site up, list its merge deltas.
use crate::{MergeDelta, Result};
use candle_core::{DType, Tensor};
use graft_model::init::Dropout;
use graft_model::{Acts, LowRank};
use std::collections::BTreeMap;

/// One layer per targeted site, by site name: a BTreeMap so that saving, listing and
/// tie-breaking follow a stable order.
pub struct SiteLayers<L>(BTreeMap<String, L>);

impl<L> SiteLayers<L> {
    pub fn new(layers: BTreeMap<String, L>) -> Self {
        Self(layers)
    }

    /// `acts` at a site the method holds a layer for, else [`Acts::Not`] (the site may run
    /// fused without hooks).
    pub fn acts_on(&self, site: &str, acts: Acts) -> Acts {
        match self.0.contains_key(site) {
            true => acts,
            false => Acts::Not,
        }
    }

    /// `f` of the layer at `site`, `None` where the method holds none.
    pub fn at<R>(
        &self,
        site: &str,
        f: impl FnOnce(&L) -> candle_core::Result<Option<R>>,
    ) -> candle_core::Result<Option<R>> {
        self.0.get(site).map_or(Ok(None), f)
    }

    /// Every layer's merge delta: `delta` gives a layer's weight delta and bias delta.
    pub fn merge_deltas(
        &self,
        delta: impl Fn(&L) -> Result<(Tensor, Option<Tensor>)>,
    ) -> Result<Option<Vec<MergeDelta>>> {
        let mut deltas = Vec::with_capacity(self.0.len());
        for (site, layer) in &self.0 {
            let (weight, bias) = delta(layer)?;
            deltas.push(MergeDelta {
                site: site.clone(),
                weight,
                bias,
            });
        }
        Ok(Some(deltas))
    }
}

/// Trainable tensors starting from `values`.
pub fn trainable<const N: usize>(
    values: [Tensor; N],
) -> candle_core::Result<[candle_core::Var; N]> {
    let vars = values
        .iter()
        .map(candle_core::Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(vars
        .try_into()
        .unwrap_or_else(|_| unreachable!("one var per value")))
}

/// A layer that adds a low-rank update to its site's product (LoRA, AdaLoRA).
pub trait LowRankLayer {
    /// The update in `dtype` with dropout's keep mask over the input; `None` when the layer
    /// adds nothing (every rank pruned).
    fn update(&self, dtype: DType, keep: Option<Tensor>) -> candle_core::Result<Option<LowRank>>;
}

impl<L: LowRankLayer> SiteLayers<L> {
    /// The update at `site` for the input `x`, with a mask drawn from `dropout`.
    pub fn low_rank(
        &self,
        site: &str,
        x: &Tensor,
        dropout: &Dropout,
    ) -> candle_core::Result<Option<LowRank>> {
        self.at(site, |layer| layer.update(x.dtype(), dropout.mask_like(x)?))
    }
}

/// `impl Hooks` for an adapter that adds low-rank updates at its sites: one whose `layers`
/// field is a [`SiteLayers`] of [`LowRankLayer`]s and whose `dropout` field a `Dropout`.
#[macro_export]
macro_rules! low_rank_hooks {
    ($adapter:ty) => {
        impl $crate::graft_model::Hooks for $adapter {
            fn acts_on(&self, site: &str) -> $crate::graft_model::Acts {
                self.layers
                    .acts_on(site, $crate::graft_model::Acts::LowRankOnly)
            }

            fn low_rank(
                &self,
                site: &$crate::graft_model::LinearSite<'_>,
                x: &$crate::candle::Tensor,
            ) -> $crate::candle::Result<Option<$crate::graft_model::LowRank>> {
                self.layers.low_rank(site.name, x, &self.dropout)
            }
        }
    };
}

impl<L> std::ops::Deref for SiteLayers<L> {
    type Target = BTreeMap<String, L>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'a, L> IntoIterator for &'a SiteLayers<L> {
    type Item = (&'a String, &'a L);
    type IntoIter = std::collections::btree_map::Iter<'a, String, L>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
