//! The soft prompt's initial values, as PEFT's `PromptTuningInit` defines them.
use crate::config::{PromptInit, PromptTuningConfig};
use graft_peft::candle::Tensor;
use graft_peft::graft_model::init;
use graft_peft::{AttachContext, Error, Result};

/// The token ids a TEXT initialisation embeds: the text's ids (special tokens included, as
/// PEFT's tokenizer call gives them) repeated, then cut, to `n`.
pub fn text_token_ids(ids: &[u32], n: usize) -> Vec<u32> {
    ids.iter().copied().cycle().take(n).collect()
}

/// `[n, hidden]` initial soft prompt.
pub fn initial_prompt(config: &PromptTuningConfig, ctx: &AttachContext) -> Result<Tensor> {
    let n = config.num_virtual_tokens;
    let hidden = ctx.info.hidden_size;
    let mut rng = init::seeded_rng(ctx.seed);
    let ids: Vec<u32> = match config.prompt_tuning_init {
        PromptInit::Random => {
            return Ok(init::normal(
                &mut rng,
                &[n, hidden],
                1.0,
                ctx.dtype,
                ctx.device,
            )?)
        }
        PromptInit::SampleVocab => init::random_ids(&mut rng, n, ctx.info.vocab_size as u32),
        PromptInit::Text => {
            let text = config
                .prompt_tuning_init_text
                .as_deref()
                .unwrap_or_default();
            let ids = (ctx.tokenize)(text)?;
            if ids.is_empty() {
                return Err(Error::Config {
                    method: "prompt-tuning".into(),
                    reason: format!("prompt_tuning_init_text {text:?} has no tokens"),
                });
            }
            text_token_ids(&ids, n)
        }
    };
    let table = ctx.base_tensor(&ctx.info.word_embeddings)?;
    let ids = Tensor::from_vec(ids, n, table.device())?;
    Ok(table
        .index_select(&ids, 0)?
        .to_dtype(ctx.dtype)?
        .to_device(ctx.device)?
        .detach())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_ids_repeat_then_cut() {
        assert_eq!(text_token_ids(&[1, 2, 3], 7), [1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(text_token_ids(&[1, 2, 3], 2), [1, 2]);
    }

    proptest! {
        #[test]
        fn text_ids_have_the_prompt_length_and_follow_the_text(
            ids in proptest::collection::vec(0u32..1000, 1..10),
            n in 1usize..40,
        ) {
            let out = text_token_ids(&ids, n);
            prop_assert_eq!(out.len(), n);
            for (i, id) in out.iter().enumerate() {
                prop_assert_eq!(*id, ids[i % ids.len()]);
            }
        }
    }
}
