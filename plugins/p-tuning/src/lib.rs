//! P-tuning (Liu et al. 2021, "GPT Understands, Too") as Hugging Face PEFT defines it, as a
//! graft plugin: virtual token embeddings, reparameterised by an MLP or a bidirectional LSTM
//! prompt encoder, placed ahead of the embedded input.
//!
//! Same shape as every method crate: `config.rs` (PEFT's fields), `encoder.rs` (the math), this
//! file (the glue to graft-peft's traits), tests beside them.
//!
//! As in PEFT, the saved adapter holds the encoder's *output* for the virtual tokens
//! (`prompt_embeddings`, `[n, token_dim]`), not the encoder's weights; a loaded adapter uses
//! that table directly.
mod config;
mod encoder;

pub use config::{EncoderType, PTuningConfig};
pub use encoder::{BiLstm, Linear, LstmDirection, Mlp, PromptEncoder, Reparameterization};

use graft_peft::candle::{Tensor, Var};
use graft_peft::graft_model::init::{self, Dropout};
use graft_peft::graft_model::{Acts, Hooks};
use graft_peft::serde_json::Value;
use graft_peft::{Adapter, AttachContext, PluginMethod, Result, Saved};

graft_peft::plugin!(PTuning, "p-tuning", "P_TUNING", prompt_learning);

/// The saved tensor: the encoder's output for the virtual tokens.
use graft_peft::prompt_learning::PROMPT_EMBEDDINGS as PROMPT_KEY;
/// Where PEFT keeps the encoder of the (only) adapter, `default`.
const ENCODER_PREFIX: &str = "prompt_encoder.default";

impl PluginMethod for PTuning {
    /// configs/p-tuning.toml, the recipe `cargo xtask train --method p-tuning` documents.
    fn recommended_config(&self) -> Option<&'static str> {
        Some(include_str!("../../../configs/p-tuning.toml"))
    }

    fn create(&self, config: &Value, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = PTuningConfig::from_train_config(config, ctx.info)?;
        let mut rng = init::seeded_rng(ctx.seed);
        let (n, d, h) = (
            config.total_virtual_tokens(),
            config.token_dim(),
            config.encoder_hidden_size(),
        );
        let encoder = match config.encoder_reparameterization_type {
            EncoderType::Mlp => PromptEncoder::mlp(&mut rng, n, d, h, ctx.dtype, ctx.device)?,
            EncoderType::Lstm => PromptEncoder::lstm(
                &mut rng,
                n,
                d,
                h,
                config.encoder_num_layers,
                ctx.dtype,
                ctx.device,
            )?,
        };
        Ok(Box::new(PTuningAdapter::new(
            config,
            Prompt::Encoder(encoder),
            ctx.seed,
        )))
    }

    fn load(&self, saved: &Saved, ctx: &AttachContext) -> Result<Box<dyn Adapter>> {
        let config = PTuningConfig::from_adapter_config(saved.config, ctx.info)?;
        let table = saved.tensor(
            PROMPT_KEY,
            &[config.total_virtual_tokens(), config.token_dim()],
        )?;
        let table = Var::from_tensor(&table.to_dtype(ctx.dtype)?.to_device(ctx.device)?)?;
        Ok(Box::new(PTuningAdapter::new(
            config,
            Prompt::Table(table),
            ctx.seed,
        )))
    }
}

/// Where the virtual tokens come from.
pub enum Prompt {
    /// Training from scratch: the prompt encoder runs on every forward pass.
    Encoder(PromptEncoder),
    /// A saved adapter: the encoder's output as PEFT saved it, `[n, token_dim]`.
    Table(Var),
}

pub struct PTuningAdapter {
    config: PTuningConfig,
    prompt: Prompt,
    /// Dropout masks come from here, so a seeded run is reproducible.
    dropout: Dropout,
}

impl PTuningAdapter {
    fn new(config: PTuningConfig, prompt: Prompt, seed: u64) -> Self {
        Self {
            dropout: Dropout::new(config.encoder_dropout, seed ^ 0x97_7e_d0),
            config,
            prompt,
        }
    }

    pub fn config(&self) -> &PTuningConfig {
        &self.config
    }

    pub fn prompt_source(&self) -> &Prompt {
        &self.prompt
    }

    /// The virtual tokens `[n, token_dim]` (dropout applies only while training).
    pub fn virtual_tokens(&self) -> graft_peft::candle::Result<Tensor> {
        match &self.prompt {
            Prompt::Encoder(encoder) => encoder.forward(&|x| self.dropout.apply(x)),
            Prompt::Table(table) => Ok(table.as_tensor().clone()),
        }
    }
}

impl Hooks for PTuningAdapter {
    /// Acts through prompts only: every linear site may run fused.
    fn acts_on(&self, _site: &str) -> Acts {
        Acts::Not
    }

    fn prompt(&self, batch: usize) -> graft_peft::candle::Result<Option<Tensor>> {
        let tokens = self.virtual_tokens()?;
        let (n, d) = tokens.dims2()?;
        tokens.unsqueeze(0)?.broadcast_as((batch, n, d)).map(Some)
    }
}

impl Adapter for PTuningAdapter {
    fn trainable(&self) -> Vec<(String, Var)> {
        match &self.prompt {
            Prompt::Encoder(encoder) => encoder.named(ENCODER_PREFIX),
            Prompt::Table(table) => vec![(PROMPT_KEY.to_string(), table.clone())],
        }
    }

    fn dropout(&self) -> Option<&Dropout> {
        Some(&self.dropout)
    }

    fn config_json(&self) -> Value {
        self.config.to_json()
    }

    /// PEFT saves the encoder's output for the virtual tokens, not its weights. It is computed
    /// without dropout: the prompt the model runs with in evaluation.
    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let table = match &self.prompt {
            Prompt::Encoder(encoder) => encoder.forward(&|x| Ok(x.clone()))?.detach(),
            Prompt::Table(table) => table.as_tensor().clone(),
        };
        Ok(vec![(PROMPT_KEY.to_string(), table)])
    }
}

#[cfg(test)]
mod p_tuning_tests {
    use super::*;
    use graft_peft::candle::{DType, Device};
    use graft_peft::graft_model::ModelInfo;
    use graft_peft::serde_json::json;
    use proptest::prelude::*;

    fn info(hidden: usize) -> ModelInfo {
        ModelInfo {
            model_type: "bert".into(),
            hidden_size: hidden,
            num_layers: 2,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: hidden,
            vocab_size: 10,
            word_embeddings: "embeddings.word_embeddings.weight".into(),
        }
    }

    fn create(settings: &Value, hidden: usize, seed: u64) -> Box<dyn Adapter> {
        let info = info(hidden);
        let tokenize = |_: &str| -> Result<Vec<u32>> { Ok(vec![]) };
        let ctx = AttachContext {
            info: &info,
            sites: &[],
            dtype: DType::F64,
            device: &Device::Cpu,
            seed,
            base_tensors: &[],
            quantized: &[],
            tokenize: &tokenize,
            total_steps: 0,
        };
        PTuning.create(settings, &ctx).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The prompt is `[batch, n, token_dim]` and every row of the batch is the same.
        #[test]
        fn prompt_is_batch_by_n_by_token_dim_and_the_same_for_every_row(
            n in 1usize..6, batch in 1usize..5, hidden in 1usize..9, encoder_hidden in 1usize..6,
            lstm in any::<bool>(), layers in 1usize..3, dropout in 0.0f64..0.5,
            training in any::<bool>(), seed in any::<u64>(),
        ) {
            let settings = json!({
                "num_virtual_tokens": n,
                "encoder_reparameterization_type": if lstm { "LSTM" } else { "MLP" },
                "encoder_hidden_size": encoder_hidden,
                "encoder_num_layers": layers,
                "encoder_dropout": dropout,
            });
            let mut adapter = create(&settings, hidden, seed);
            adapter.set_training(training);
            let prompt = adapter.prompt(batch).unwrap().unwrap();
            prop_assert_eq!(prompt.dims(), &[batch, n, hidden]);
            let first = prompt.get(0).unwrap().to_vec2::<f64>().unwrap();
            for row in 1..batch {
                prop_assert_eq!(&prompt.get(row).unwrap().to_vec2::<f64>().unwrap(), &first);
            }
        }
    }

    #[test]
    fn saved_table_is_the_encoder_output_and_names_follow_peft() {
        let adapter = create(
            &json!({ "num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM",
                     "encoder_hidden_size": 2, "encoder_num_layers": 2 }),
            4,
            1,
        );
        let saved = adapter.tensors().unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].0, "prompt_embeddings");
        let prompt = adapter.prompt(1).unwrap().unwrap().squeeze(0).unwrap();
        assert_eq!(
            saved[0].1.to_vec2::<f64>().unwrap(),
            prompt.to_vec2::<f64>().unwrap()
        );
        let names: Vec<String> = adapter.trainable().into_iter().map(|(k, _)| k).collect();
        for name in [
            "prompt_encoder.default.embedding.weight",
            "prompt_encoder.default.lstm_head.weight_ih_l0",
            "prompt_encoder.default.lstm_head.bias_hh_l1_reverse",
            "prompt_encoder.default.mlp_head.0.weight",
            "prompt_encoder.default.mlp_head.2.bias",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
        }
        assert_eq!(names.len(), 1 + 16 + 4);
    }
}
