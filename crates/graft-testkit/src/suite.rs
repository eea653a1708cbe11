//! A method's standard tests, written once: [`method_tests!`](crate::method_tests) turns a
//! [`Suite`] into `#[test]` functions, so that a plugin's test file holds only what is its own.
use crate::classifier::{check_gradients, check_merge, check_reload, check_trains, Reloaded};
use crate::decoder::{check_accumulation, check_decoder_classifier, check_lm_families};
use crate::fixtures::{randomize, randomize_vars, Family};
use crate::tagging::check_tags;
use crate::{Error, Result};
use graft_peft::Method;
use graft_trainer::lm::CausalLm;
use graft_trainer::task::Classifier;

/// Tensors that start at zero (LoRA's B, AdaLoRA's E) leave the other factor without gradient
/// until they move, so the gradient checks draw them from normal(0, std) first (seed 3).
#[derive(Clone, Copy)]
pub struct Randomize {
    pub select: fn(&str) -> bool,
    pub std: f64,
}

/// How a method's standard checks run: the method, its config on MiniLM, and each check's
/// numbers.
pub struct Suite {
    pub make: fn() -> Box<dyn Method>,
    pub settings: serde_json::Value,
    /// Entries sampled per trainable tensor, and how many tensors the method trains.
    pub gradients: (usize, usize),
    /// AdamW steps and learning rate of the training check.
    pub trains: (usize, f64),
    pub randomize: Option<Randomize>,
    /// Tolerance of the merge check after the reload, for a mergeable method.
    pub merge: Option<f64>,
    /// The config on decoders and its (steps, learning rate) there.
    pub decoders: Option<(serde_json::Value, (usize, f64))>,
    /// AdamW steps and learning rate of the token-classification check, if not `trains`'.
    pub tags: Option<(usize, f64)>,
}

impl Suite {
    pub fn new(
        make: fn() -> Box<dyn Method>,
        settings: serde_json::Value,
        gradients: (usize, usize),
        trains: (usize, f64),
    ) -> Self {
        Self {
            make,
            settings,
            gradients,
            trains,
            randomize: None,
            merge: None,
            decoders: None,
            tags: None,
        }
    }

    pub fn randomizing(self, select: fn(&str) -> bool, std: f64) -> Self {
        let randomize = Some(Randomize { select, std });
        Self { randomize, ..self }
    }

    pub fn merging(self, tolerance: f64) -> Self {
        let merge = Some(tolerance);
        Self { merge, ..self }
    }

    /// The token-classification check's own (steps, learning rate).
    pub fn tagging(self, schedule: (usize, f64)) -> Self {
        let tags = Some(schedule);
        Self { tags, ..self }
    }

    pub fn on_decoders(self, settings: serde_json::Value, schedule: (usize, f64)) -> Self {
        let decoders = Some((settings, schedule));
        Self { decoders, ..self }
    }

    fn prepare(&self, classifier: &Classifier) -> Result<()> {
        match self.randomize {
            Some(r) => randomize(classifier, r.select, r.std, 3),
            None => Ok(()),
        }
    }

    fn prepare_lm(&self, lm: &CausalLm) -> Result<()> {
        match self.randomize {
            Some(r) => randomize_vars(&lm.trainable(), r.select, r.std, 3),
            None => Ok(()),
        }
    }

    /// [`check_gradients`], and every one of the method's tensors sampled.
    pub fn check_gradients(&self) -> Result<()> {
        let method = (self.make)();
        let (per_tensor, tensors) = self.gradients;
        let samples = check_gradients(method.as_ref(), &self.settings, per_tensor, |c| {
            self.prepare(c)
        })?;
        if samples.len() != per_tensor * tensors {
            return Err(Error::Check(format!(
                "{}: sampled {} entries, expected {per_tensor} in each of {tensors} tensors",
                method.name(),
                samples.len()
            )));
        }
        Ok(())
    }

    /// [`check_trains`]; returns the losses.
    pub fn check_trains(&self) -> Result<Vec<f64>> {
        let (steps, lr) = self.trains;
        check_trains((self.make)().as_ref(), &self.settings, steps, lr)
    }

    /// [`check_tags`]: token classification, at the suite's tagging schedule (else `trains`').
    pub fn check_tags(&self) -> Result<Vec<f64>> {
        let (steps, lr) = self.tags.unwrap_or(self.trains);
        check_tags(
            (self.make)().as_ref(),
            &self.settings,
            steps,
            lr,
            (self.make)(),
        )
    }

    /// [`check_reload`], then [`check_merge`] for a mergeable method.
    pub fn check_reload(&self) -> Result<Reloaded> {
        let method = (self.make)();
        let mut reloaded = check_reload(method.as_ref(), &self.settings, (self.make)())?;
        if let Some(tolerance) = self.merge {
            check_merge(&mut reloaded, tolerance)?;
        }
        Ok(reloaded)
    }

    fn decoder_config(&self) -> Result<(&serde_json::Value, (usize, f64))> {
        match &self.decoders {
            Some((settings, schedule)) => Ok((settings, *schedule)),
            None => Err(Error::Check("the suite has no decoder config".into())),
        }
    }

    /// [`check_lm_families`] with the decoder config.
    pub fn check_decoders(&self) -> Result<()> {
        let (settings, schedule) = self.decoder_config()?;
        check_lm_families(self.make, settings, schedule, |lm| self.prepare_lm(lm))
    }

    /// [`check_accumulation`] on both decoder families, with `settings` (dropout off).
    pub fn check_accumulation(&self, settings: &serde_json::Value) -> Result<()> {
        let method = (self.make)();
        for family in [Family::Llama, Family::ChatGlm] {
            check_accumulation(method.as_ref(), settings, family, |lm| self.prepare_lm(lm))?;
        }
        Ok(())
    }

    /// [`check_decoder_classifier`] with the decoder config; returns the losses.
    pub fn check_decoder_classifier(&self) -> Result<Vec<f64>> {
        let (settings, schedule) = self.decoder_config()?;
        let method = (self.make)();
        check_decoder_classifier(method.as_ref(), settings, schedule, (self.make)())
    }
}

/// A module `$module` of `#[test]` functions, one for each check listed, on the [`Suite`]
/// `$suite`: `gradients`, `trains`, `reloads` (and merges, if the suite says so), `tags`
/// (token classification), `decoders` (causal LM on every family) and `decoder_classifier`
/// (sequence classification on one).
#[macro_export]
macro_rules! method_tests {
    ($module:ident, $suite:expr, [$($check:ident),+ $(,)?]) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $($crate::method_tests!(@test $check, $suite);)+
        }
    };
    (@test gradients, $suite:expr) => {
        #[test]
        fn finite_differences_agree_with_autograd_for_every_tensor() {
            $suite.check_gradients().unwrap();
        }
    };
    (@test trains, $suite:expr) => {
        #[test]
        fn trains_on_a_real_batch_and_every_tensor_gets_a_gradient() {
            let losses = $suite.check_trains().unwrap();
            eprintln!("losses: {losses:?}");
        }
    };
    (@test tags, $suite:expr) => {
        /// Token classification (a label per token on MiniLM): trains, and reloads to the
        /// same labels.
        #[test]
        fn tags_tokens_and_reloads_to_the_same_labels() {
            let losses = $suite.check_tags().unwrap();
            eprintln!("losses: {losses:?}");
        }
    };
    (@test reloads, $suite:expr) => {
        #[test]
        fn saved_adapter_reloads_to_identical_logits() {
            $suite.check_reload().unwrap();
        }
    };
    (@test decoders, $suite:expr) => {
        /// On both decoder families: gradients, training and reload (see
        /// `graft_testkit::check_lm_method`), half precision and a quantized base.
        #[test]
        fn trains_and_reloads_on_llama_and_chatglm() {
            $suite.check_decoders().unwrap();
        }
    };
    (@test decoder_classifier, $suite:expr) => {
        /// Sequence classification on a decoder, as LlamaForSequenceClassification with PEFT's
        /// `score` head.
        #[test]
        fn classifies_on_a_decoder() {
            let losses = $suite.check_decoder_classifier().unwrap();
            eprintln!("losses: {losses:?}");
        }
    };
}
