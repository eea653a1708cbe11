//! The fine-tuned extractor: a decoder adapter written by `graft train-lm` on prompt ->
//! "kw1; kw2; ..." pairs, asked each paper's prompt as it was trained, answering greedily; an
//! answer cut by the token cap loses its last, unfinished keyword.
use super::{parse_keywords, KeywordExtractor, Paper};
use crate::lm::{clip_chars, CausalLm};
use crate::{Error, Result};
use candle_core::Device;
use graft_model::generate::Sampling;
use graft_peft::loader::Registry;
use graft_tokenizer::Template;
use std::path::Path;

pub struct GenerativeExtractor {
    lm: CausalLm,
    prompt: Template,
    max_prompt_chars: usize,
    max_new_tokens: usize,
}

impl GenerativeExtractor {
    /// Opens the adapter at `dir`; answers are cut after `max_new_tokens` tokens.
    pub fn open(
        dir: &Path,
        registry: &Registry,
        device: &Device,
        max_new_tokens: usize,
    ) -> Result<Self> {
        let lm = CausalLm::open(dir, registry, device)?;
        let Some(source) = lm.spec.prompt.clone() else {
            return Err(Error::Adapter {
                path: dir.to_path_buf(),
                reason: "this adapter was trained on JSONL pairs and records no CSV prompt \
                         template, so a paper's prompt cannot be rendered as it was trained; \
                         train it from a CSV with data.prompt (configs/lm/smollm2-keywords.toml)"
                    .into(),
            });
        };
        if max_new_tokens == 0 {
            return Err(Error::Config(
                "the keyword answer's token cap must be at least 1".into(),
            ));
        }
        Ok(Self {
            prompt: Template::parse(&source.template)?,
            max_prompt_chars: source.max_chars,
            lm,
            max_new_tokens,
        })
    }

    /// The columns the prompt template reads: a data file must have them.
    pub fn columns(&self) -> Vec<&str> {
        self.prompt.columns()
    }
}

impl KeywordExtractor for GenerativeExtractor {
    fn name(&self) -> &str {
        "generative"
    }

    fn extract(&self, paper: &Paper) -> Result<Vec<String>> {
        let prompt = clip_chars(
            self.prompt.render(|column| paper.field(column))?,
            self.max_prompt_chars,
        );
        let answer = self.lm.generate(
            &prompt,
            self.max_new_tokens,
            &Sampling::greedy(),
            &mut |_| {},
        )?;
        let mut keywords = parse_keywords(&answer.text);
        // An answer the token cap cut ends in an unfinished keyword.
        if !answer.stopped && keywords.len() > 1 {
            keywords.pop();
        }
        Ok(keywords)
    }
}
