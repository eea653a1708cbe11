use crate::chat::{ChatTemplate, Segment};
use crate::error::{Error, Result};
use crate::tokenizer::{Padding, TextTokenizer};
use serde::{Deserialize, Serialize};

/// One fine-tuning example: the user's prompt and the answer the model should learn (a JSON
/// Lines record's `prompt` and `response`, or a CSV row through templates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptResponse {
    pub prompt: String,
    pub response: String,
}

/// Label of a position that takes no loss (PyTorch's and Hugging Face's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A padded batch for causal-LM fine-tuning, every vector row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CausalBatch {
    /// Prompt, then response, then the stop token; padded on the right with the pad id.
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// The id the model must predict at each position, i.e. the next input id, where that is
    /// a response or stop token; [`IGNORE_INDEX`] on the prompt, the last token and padding.
    /// Already shifted: compare the logits at position i with `labels[i]`.
    pub labels: Vec<i64>,
    pub batch: usize,
    pub seq_len: usize,
}

/// The prompt ids a model is given to generate an answer: exactly those a training example
/// starts with (the tokenizer's special tokens included), never truncated.
pub fn encode_prompt(
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    prompt: &str,
) -> Result<Vec<u32>> {
    Ok(prompt_ids(tokenizer, template, 0, prompt)?.ids)
}

/// Encodes prompt-response pairs for training: loss on the response and the stop token only.
///
/// Every row is at most `max_len` tokens. A row that would be longer loses tokens from the
/// start of its prompt, keeping the special tokens the tokenizer puts first (Llama's BOS); a
/// response (stop token included) that leaves no room for one prompt token is an error.
/// Rows are padded on the right to the longest row, or to `max_len` with `Padding::Fixed`.
pub fn encode_causal(
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    pairs: &[PromptResponse],
    max_len: usize,
) -> Result<CausalBatch> {
    let stop = template.stop_token_id(tokenizer)?;
    let mut rows = Vec::with_capacity(pairs.len());
    for (index, pair) in pairs.iter().enumerate() {
        rows.push(encode_row(tokenizer, template, stop, index, pair, max_len)?);
    }

    let seq_len = match tokenizer.padding() {
        Padding::Fixed => max_len,
        Padding::Longest => rows.iter().map(|r| r.ids.len()).max().unwrap_or(0),
    };
    let batch = rows.len();
    let mut input_ids = Vec::with_capacity(batch * seq_len);
    let mut attention_mask = Vec::with_capacity(batch * seq_len);
    let mut labels = Vec::with_capacity(batch * seq_len);
    for row in &rows {
        let len = row.ids.len();
        let pad = seq_len - len;
        input_ids.extend_from_slice(&row.ids);
        input_ids.extend(std::iter::repeat_n(tokenizer.pad_id(), pad));
        attention_mask.extend(std::iter::repeat_n(1, len));
        attention_mask.extend(std::iter::repeat_n(0, pad));
        for i in 0..len {
            let next = i + 1;
            if next < len && next >= row.prompt_len {
                labels.push(i64::from(row.ids[next]));
            } else {
                labels.push(IGNORE_INDEX);
            }
        }
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
    }

    Ok(CausalBatch {
        input_ids,
        attention_mask,
        labels,
        batch,
        seq_len,
    })
}

/// One example's ids, unpadded: `prompt_len` prompt tokens, then the response.
struct Row {
    ids: Vec<u32>,
    prompt_len: usize,
}

fn encode_row(
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    stop: Option<u32>,
    index: usize,
    pair: &PromptResponse,
    max_len: usize,
) -> Result<Row> {
    let prompt = prompt_ids(tokenizer, template, index, &pair.prompt)?;
    let prompt_ids = &prompt.ids[..];
    // The response continues the sequence: no second BOS.
    let mut response = Vec::new();
    if let Some(prefix) = template.response_prefix() {
        response.extend(text_ids(tokenizer, index, prefix)?);
    }
    response.extend(text_ids(tokenizer, index, &pair.response)?);
    response.extend(stop);

    if response.is_empty() {
        return Err(Error::NothingToLearn {
            index,
            template: template.name(),
        });
    }
    // The first response token is predicted from the last prompt token, so there must be one.
    if prompt_ids.is_empty() {
        return Err(Error::EmptyPrompt {
            path: tokenizer.path().to_path_buf(),
            index,
        });
    }

    let lead = prompt.lead;
    let min_prompt = lead.max(1);
    if response.len() + min_prompt > max_len {
        return Err(Error::ResponseTooLong {
            index,
            response_tokens: response.len(),
            prompt_tokens: min_prompt,
            max_len,
        });
    }

    let budget = max_len - response.len();
    let mut ids = Vec::with_capacity(prompt_ids.len().min(budget) + response.len());
    if prompt_ids.len() <= budget {
        ids.extend_from_slice(prompt_ids);
    } else {
        // Drop from the start of the prompt: the text next to the answer matters most.
        ids.extend_from_slice(&prompt_ids[..lead]);
        ids.extend_from_slice(&prompt_ids[prompt_ids.len() - (budget - lead)..]);
    }
    let prompt_len = ids.len();
    ids.extend_from_slice(&response);
    Ok(Row { ids, prompt_len })
}

/// A prompt's ids, never truncated, and how many of them lead: they survive truncation, since
/// the model has always seen them at the start.
struct PromptIds {
    ids: Vec<u32>,
    lead: usize,
}

/// The rendered prompt: for ChatGLM its segments, special tokens by id and texts without the
/// tokenizer's special tokens (the template has them); for the others one text with the
/// tokenizer's special tokens, those it put first (Llama's BOS) leading.
fn prompt_ids(
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    index: usize,
    prompt: &str,
) -> Result<PromptIds> {
    let segments = template.prompt_segments(prompt);
    if segments.is_empty() {
        let encoding =
            tokenizer.encode_untruncated(index, &template.render_prompt(prompt), true)?;
        let lead = encoding
            .get_special_tokens_mask()
            .iter()
            .take_while(|&&special| special == 1)
            .count();
        return Ok(PromptIds {
            ids: encoding.get_ids().to_vec(),
            lead,
        });
    }
    let mut ids = Vec::new();
    let mut lead = 0;
    for (i, segment) in segments.iter().enumerate() {
        match segment {
            Segment::Token(token) => ids.push(template.token_id(tokenizer, token)?),
            Segment::Text(text) => ids.extend(text_ids(tokenizer, index, text)?),
        }
        if i + 1 == template.kept_segments() {
            lead = ids.len();
        }
    }
    Ok(PromptIds { ids, lead })
}

/// Ids of a text inside a sequence: no special tokens, never truncated.
fn text_ids(tokenizer: &TextTokenizer, index: usize, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode_untruncated(index, text, false)?
        .get_ids()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_paths::{chatglm_tokenizer, smollm2_tokenizer, stories_tokenizer};
    use proptest::prelude::*;

    const BOS: u32 = 1;
    const EOS: u32 = 2;

    fn pair(prompt: &str, response: &str) -> PromptResponse {
        PromptResponse {
            prompt: prompt.into(),
            response: response.into(),
        }
    }

    fn plain() -> ChatTemplate {
        ChatTemplate::parse("plain").unwrap()
    }

    /// Row `r` of a `[batch, seq_len]` vector.
    fn row<T>(v: &[T], seq_len: usize, r: usize) -> &[T] {
        &v[r * seq_len..(r + 1) * seq_len]
    }

    /// Positions that take a loss.
    fn labelled(labels: &[i64]) -> Vec<usize> {
        (0..labels.len())
            .filter(|&i| labels[i] != IGNORE_INDEX)
            .collect()
    }

    #[test]
    fn labels_are_the_next_response_token_and_end_with_stop() {
        let tok = stories_tokenizer(64);
        let prompt = encode_prompt(&tok, &plain(), "Once upon a time").unwrap();
        assert_eq!(prompt[0], BOS);
        let response = tok.encode_no_special("there was a cat.").unwrap();
        assert!(!response.is_empty());
        assert!(!response.contains(&BOS));

        let b = encode_causal(
            &tok,
            &plain(),
            &[pair("Once upon a time", "there was a cat.")],
            64,
        )
        .unwrap();
        let (p, r) = (prompt.len(), response.len());
        assert_eq!((b.batch, b.seq_len), (1, p + r + 1));
        let mut ids = prompt.clone();
        ids.extend(&response);
        ids.push(EOS);
        assert_eq!(b.input_ids, ids);
        assert_eq!(b.attention_mask, vec![1; p + r + 1]);

        let mut labels = vec![IGNORE_INDEX; p - 1];
        labels.extend(response.iter().map(|&id| i64::from(id)));
        labels.push(i64::from(EOS));
        labels.push(IGNORE_INDEX);
        assert_eq!(b.labels, labels);
    }

    #[test]
    fn padding_is_masked_and_unlabelled() {
        let tok = stories_tokenizer(64);
        let pairs = [
            pair("A long prompt about a dog", "Yes."),
            pair("Hi", "Hello there, friend."),
        ];
        let b = encode_causal(&tok, &plain(), &pairs, 64).unwrap();
        assert_eq!(b.batch, 2);
        assert_eq!(b.input_ids.len(), 2 * b.seq_len);
        assert_eq!(b.labels.len(), 2 * b.seq_len);
        for (r, pr) in pairs.iter().enumerate() {
            let ids = row(&b.input_ids, b.seq_len, r);
            let mask = row(&b.attention_mask, b.seq_len, r);
            let labels = row(&b.labels, b.seq_len, r);
            let len = mask.iter().filter(|&&m| m == 1).count();
            assert!(mask[..len].iter().all(|&m| m == 1), "mask is a prefix");
            assert!(ids[len..].iter().all(|&id| id == tok.pad_id()));
            assert!(labels[len - 1..].iter().all(|&l| l == IGNORE_INDEX));
            let positions = labelled(labels);
            let response = tok.encode_no_special(&pr.response).unwrap();
            assert_eq!(positions.len(), response.len() + 1);
            // The stop token is the last labelled target, predicted from the last real token
            // but one.
            assert_eq!(*positions.last().unwrap(), len - 2);
            assert_eq!(labels[len - 2], i64::from(EOS));
            for i in positions {
                assert_eq!(labels[i], i64::from(ids[i + 1]));
            }
        }
    }

    #[test]
    fn fixed_padding_pads_to_max_len() {
        let tok = TextTokenizer::from_file(
            &crate::test_paths::stories_tokenizer_path(),
            64,
            Padding::Fixed,
        )
        .unwrap();
        let b = encode_causal(&tok, &plain(), &[pair("Hi", "Ho")], 40).unwrap();
        assert_eq!((b.batch, b.seq_len), (1, 40));
        assert_eq!(b.input_ids.len(), 40);
        let b = encode_causal(&tok, &plain(), &[], 40).unwrap();
        assert_eq!((b.batch, b.input_ids.len()), (0, 0));
    }

    #[test]
    fn long_prompts_lose_their_start_but_keep_bos() {
        let tok = stories_tokenizer(16);
        let prompt = "Once upon a time, there was a little girl named Lily. She loved to play.";
        let full = encode_prompt(&tok, &plain(), prompt).unwrap();
        let response = tok.encode_no_special("Yes.").unwrap();
        let max_len = 12;
        // Longer than both max_lens: neither truncates the other's way.
        assert!(full.len() > 16);

        let b = encode_causal(&tok, &plain(), &[pair(prompt, "Yes.")], max_len).unwrap();
        assert_eq!(b.seq_len, max_len);
        let kept = max_len - response.len() - 1;
        let mut ids = vec![BOS];
        ids.extend(&full[full.len() - (kept - 1)..]);
        ids.extend(&response);
        ids.push(EOS);
        assert_eq!(b.input_ids, ids);
        assert_eq!(labelled(&b.labels).len(), response.len() + 1);
        assert_eq!(labelled(&b.labels)[0], kept - 1);
    }

    #[test]
    fn a_response_that_does_not_fit_is_an_error() {
        let tok = stories_tokenizer(64);
        let response = tok.encode_no_special("there was a big dog").unwrap();
        // Room for the response and the stop token, but not for the BOS.
        let max_len = response.len() + 1;
        let err = encode_causal(
            &tok,
            &plain(),
            &[pair("Hi", "Hi"), pair("Hi", "there was a big dog")],
            max_len,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                Error::ResponseTooLong {
                    index: 1,
                    prompt_tokens: 1,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains(&format!("max_len {max_len}")), "{msg}");
        assert!(encode_causal(
            &tok,
            &plain(),
            &[pair("Hi", "there was a big dog")],
            max_len + 1
        )
        .is_ok());
    }

    #[test]
    fn chatml_over_smollm2_ends_with_im_end() {
        let tok = smollm2_tokenizer(256);
        let chatml = ChatTemplate::parse("chatml").unwrap();
        let prompt = encode_prompt(&tok, &chatml, "What is the capital of France?").unwrap();
        // `<|im_start|>` is one added token, and SmolLM2 adds no BOS.
        assert_eq!(prompt[0], 1);
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        let b = encode_causal(
            &tok,
            &chatml,
            &[pair("What is the capital of France?", "Paris.")],
            256,
        )
        .unwrap();
        let response = tok.encode_no_special("Paris.").unwrap();
        assert_eq!(&b.input_ids[..prompt.len()], &prompt[..]);
        assert_eq!(*b.input_ids.last().unwrap(), im_end);
        let positions = labelled(&b.labels);
        assert_eq!(positions.len(), response.len() + 1);
        assert_eq!(positions[0], prompt.len() - 1);
        assert_eq!(b.labels[*positions.last().unwrap()], i64::from(im_end));
    }

    #[test]
    fn a_prompt_without_tokens_is_an_error() {
        // SmolLM2 adds no special tokens, so an empty plain prompt has no token to start from.
        let tok = smollm2_tokenizer(64);
        let err = encode_causal(&tok, &plain(), &[pair("", "Hi")], 64).unwrap_err();
        assert!(matches!(err, Error::EmptyPrompt { index: 0, .. }), "{err}");
        // Llama's BOS is enough.
        let tok = stories_tokenizer(64);
        let b = encode_causal(&tok, &plain(), &[pair("", "Hi")], 64).unwrap();
        assert_eq!(b.input_ids[0], BOS);
        assert_eq!(b.labels[0], i64::from(b.input_ids[1]));
    }

    #[test]
    fn missing_stop_token_is_an_error() {
        let tok = stories_tokenizer(64);
        let chatml = ChatTemplate::parse("chatml").unwrap();
        let err = encode_causal(&tok, &chatml, &[pair("Hi", "Ho")], 64).unwrap_err();
        assert!(matches!(err, Error::MissingStopToken { .. }), "{err}");
        let custom = plain().with_stop("<nope>").unwrap();
        let err = encode_causal(&tok, &custom, &[pair("Hi", "Ho")], 64).unwrap_err();
        assert!(matches!(err, Error::MissingStopToken { .. }), "{err}");
        assert!(err.to_string().contains("<nope>"), "{err}");
    }

    #[test]
    fn chatglm2_prompts_start_with_gmask_sop_and_keep_them() {
        let (_dir, tok) = chatglm_tokenizer(256);
        let t = ChatTemplate::ChatGlm2;
        let text = tok
            .encode_no_special("[Round 1]\n\n问：Hi\n\n答：")
            .unwrap();
        let mut prompt = vec![265, 267];
        prompt.extend(&text);
        assert_eq!(encode_prompt(&tok, &t, "Hi").unwrap(), prompt);

        let b = encode_causal(&tok, &t, &[pair("Hi", "Hi")], 256).unwrap();
        let mut ids = prompt.clone();
        ids.extend([263, 2]); // `▁Hi`, `</s>`
        assert_eq!(b.input_ids, ids);
        assert_eq!(labelled(&b.labels), vec![prompt.len() - 1, prompt.len()]);

        // Truncation drops the start of the text, never `[gMASK] sop`.
        let b = encode_causal(&tok, &t, &[pair("Hi", "Hi")], 6).unwrap();
        assert_eq!(b.input_ids[..2], [265, 267]);
        assert_eq!(b.input_ids[2..4], prompt[prompt.len() - 2..]);
        assert_eq!(b.input_ids[4..], [263, 2]);

        // A vocabulary without them is an error, not a silent plain prompt.
        let err = encode_causal(&stories_tokenizer(64), &t, &[pair("Hi", "Ho")], 64).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MissingTemplateToken {
                    token: "[gMASK]",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn chatglm3_matches_thudm_build_chat_input_and_learns_the_newline() {
        let (_dir, tok) = chatglm_tokenizer(256);
        let t = ChatTemplate::ChatGlm3;
        // `[gMASK] sop <|user|>`, "\n" alone (`▁` `<0x0A>`), "Hi" alone (`▁Hi`), `<|assistant|>`.
        let prompt = vec![265, 267, 270, 259, 13, 263, 271];
        assert_eq!(encode_prompt(&tok, &t, "Hi").unwrap(), prompt);

        let b = encode_causal(&tok, &t, &[pair("Hi", "Hi")], 256).unwrap();
        let mut ids = prompt.clone();
        ids.extend([259, 13, 263, 2]);
        assert_eq!(b.input_ids, ids);
        // The response's "\n", its text and `</s>` are learned; `<|assistant|>` is given.
        let p = prompt.len();
        assert_eq!(labelled(&b.labels), vec![p - 1, p, p + 1, p + 2]);
        assert_eq!(b.labels[p - 1], 259);

        // A long prompt keeps `[gMASK] sop <|user|>` and its "\n".
        let long = "Hi ".repeat(20);
        let b = encode_causal(&tok, &t, &[pair(&long, "Hi")], 12).unwrap();
        assert_eq!(b.input_ids[..5], [265, 267, 270, 259, 13]);
        assert_eq!(b.input_ids[7], 271);
        assert_eq!(b.input_ids.len(), 12);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_response_token_and_the_stop_token_is_labelled(
            prompt in "\\PC{0,60}",
            response in "\\PC{0,40}",
            max_len in 2usize..96,
        ) {
            let tok = stories_tokenizer(64);
            let template = plain();
            let r = tok.encode_no_special(&response).unwrap().len() + 1;
            let full_prompt = encode_prompt(&tok, &template, &prompt).unwrap();
            match encode_causal(&tok, &template, &[pair(&prompt, &response)], max_len) {
                Ok(b) => {
                    let len = b.attention_mask.iter().filter(|&&m| m == 1).count();
                    prop_assert_eq!(len, (full_prompt.len() + r).min(max_len));
                    prop_assert_eq!(b.input_ids[0], BOS);
                    let positions = labelled(&b.labels);
                    prop_assert_eq!(positions.len(), r);
                    // The labelled positions are the last r real positions but one.
                    prop_assert_eq!(positions[0], len - 1 - r);
                    prop_assert_eq!(*positions.last().unwrap(), len - 2);
                    for i in positions {
                        prop_assert_eq!(b.labels[i], i64::from(b.input_ids[i + 1]));
                    }
                    prop_assert_eq!(b.labels[len - 2], i64::from(EOS));
                }
                Err(Error::ResponseTooLong { response_tokens, .. }) => {
                    prop_assert_eq!(response_tokens, r);
                    prop_assert!(r + 1 > max_len);
                }
                Err(other) => prop_assert!(false, "unexpected error: {}", other),
            }
        }
    }
}
