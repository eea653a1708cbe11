use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// End-of-sequence tokens looked up, in this order, when a plain template is given no stop token:
/// Llama/Mistral, GPT-2/SmolLM, Qwen/ChatML, Gemma.
pub const EOS_CANDIDATES: [&str; 4] = ["</s>", "<|endoftext|>", "<|im_end|>", "<eos>"];

const CHATML_STOP: &str = "<|im_end|>";
/// ChatGLM2's and ChatGLM3's EOS (THUDM's `eos_token`).
const CHATGLM_STOP: &str = "</s>";
/// What THUDM's ChatGLM tokenizer puts before every input (`get_prefix_tokens`).
const CHATGLM_PREFIX: [&str; 2] = ["[gMASK]", "sop"];
/// Where ChatGLM3's generation also stops (its `generation_config.json` / `chat`): the model
/// opening the user's or a tool's turn.
const CHATGLM3_EXTRA_STOPS: [&str; 2] = ["<|user|>", "<|observation|>"];

/// A part of a prompt or response as the model sees it: text to tokenize, or a token given by
/// name (never looked for in text, since ChatGLM's tokenizer does not read `sop` in text as
/// the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Token(&'static str),
    Text(String),
}

/// How a user prompt is wrapped before the model sees it, and which token ends an answer.
///
/// In a config file the names are those of [`ChatTemplate::parse`]: `"chatglm2"`, or a table
/// for the variants with options, e.g. `{ chatml = { system = "Be brief." } }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ChatTemplate {
    /// The prompt as is. The answer ends with `stop` if given, else with the first of
    /// [`EOS_CANDIDATES`] the vocabulary has, else with nothing.
    Plain {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop: Option<String>,
    },
    /// ChatGLM2's single-turn format (THUDM's `build_prompt` for one round), after the
    /// `[gMASK] sop` prefix tokens; the answer ends with `</s>`.
    #[serde(rename = "chatglm2")]
    ChatGlm2,
    /// ChatGLM3's single-turn format (THUDM's `build_chat_input`): `[gMASK] sop <|user|>`, the
    /// ids of `"\n"`, those of the prompt, `<|assistant|>`; the answer is the ids of `"\n"` then
    /// those of the response, ended with `</s>`. Generation also stops at `<|user|>` and
    /// `<|observation|>`.
    #[serde(rename = "chatglm3")]
    ChatGlm3,
    /// ChatML turns, with an optional system turn first; the answer ends with `<|im_end|>`.
    #[serde(rename = "chatml")]
    ChatMl {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system: Option<String>,
    },
}

impl ChatTemplate {
    /// The short names `parse` accepts.
    pub const NAMES: [&'static str; 4] = ["plain", "chatglm2", "chatglm3", "chatml"];

    /// A template from its short name (see [`ChatTemplate::NAMES`]), without options.
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim() {
            "plain" => Ok(Self::Plain { stop: None }),
            "chatglm2" => Ok(Self::ChatGlm2),
            "chatglm3" => Ok(Self::ChatGlm3),
            "chatml" => Ok(Self::ChatMl { system: None }),
            _ => Err(Error::UnknownChatTemplate {
                name: name.to_string(),
                known: Self::NAMES.iter().map(|n| n.to_string()).collect(),
            }),
        }
    }

    /// The short name, as `parse` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Plain { .. } => "plain",
            Self::ChatGlm2 => "chatglm2",
            Self::ChatGlm3 => "chatglm3",
            Self::ChatMl { .. } => "chatml",
        }
    }

    /// Sets the system message; only ChatML has one.
    pub fn with_system(self, system: impl Into<String>) -> Result<Self> {
        match self {
            Self::ChatMl { .. } => Ok(Self::ChatMl {
                system: Some(system.into()),
            }),
            other => Err(Error::UnsupportedTemplateOption {
                template: other.name(),
                option: "system message",
                supported_by: "chatml",
            }),
        }
    }

    /// Sets the token that ends an answer; only the plain template takes one, the chat formats
    /// have their own.
    pub fn with_stop(self, stop: impl Into<String>) -> Result<Self> {
        match self {
            Self::Plain { .. } => Ok(Self::Plain {
                stop: Some(stop.into()),
            }),
            other => Err(Error::UnsupportedTemplateOption {
                template: other.name(),
                option: "stop token",
                supported_by: "plain",
            }),
        }
    }

    /// The text the model sees before the answer. ChatGLM's special tokens are written by name
    /// here, but encoded by id (see [`crate::encode_prompt`]), never read from text.
    pub fn render_prompt(&self, prompt: &str) -> String {
        match self {
            Self::Plain { .. } | Self::ChatMl { .. } => self.text_prompt(prompt),
            Self::ChatGlm2 | Self::ChatGlm3 => self
                .prompt_segments(prompt)
                .into_iter()
                .map(|s| match s {
                    Segment::Token(t) => t.to_string(),
                    Segment::Text(t) => t,
                })
                .collect(),
        }
    }

    /// The prompt as segments, for the formats that give special tokens by id; `[]` for those
    /// whose prompt is one text encoded with the tokenizer's own special tokens.
    pub(crate) fn prompt_segments(&self, prompt: &str) -> Vec<Segment> {
        let prefix = CHATGLM_PREFIX.iter().map(|&t| Segment::Token(t));
        match self {
            Self::Plain { .. } | Self::ChatMl { .. } => Vec::new(),
            Self::ChatGlm2 => prefix
                .chain([Segment::Text(format!("[Round 1]\n\n问：{prompt}\n\n答："))])
                .collect(),
            // THUDM encodes the role's "\n" and the message apart, so they are two texts here.
            Self::ChatGlm3 => prefix
                .chain([
                    Segment::Token("<|user|>"),
                    Segment::Text("\n".into()),
                    Segment::Text(prompt.to_string()),
                    Segment::Token("<|assistant|>"),
                ])
                .collect(),
        }
    }

    /// How many leading segments of `prompt_segments` survive truncation of a long prompt.
    pub(crate) fn kept_segments(&self) -> usize {
        match self {
            Self::Plain { .. } | Self::ChatMl { .. } => 0,
            Self::ChatGlm2 => CHATGLM_PREFIX.len(),
            // The prefix and the opening of the user turn (`<|user|>` and its "\n").
            Self::ChatGlm3 => CHATGLM_PREFIX.len() + 2,
        }
    }

    /// Text encoded apart before the response: ChatGLM3's assistant turn starts with "\n".
    pub(crate) fn response_prefix(&self) -> Option<&'static str> {
        match self {
            Self::ChatGlm3 => Some("\n"),
            _ => None,
        }
    }

    fn text_prompt(&self, prompt: &str) -> String {
        match self {
            // ChatGLM's prompts are segments (`prompt_segments`); this is never their text.
            Self::Plain { .. } | Self::ChatGlm2 | Self::ChatGlm3 => prompt.to_string(),
            Self::ChatMl { system } => {
                let mut text = String::new();
                if let Some(system) = system {
                    text.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
                }
                text.push_str(&format!(
                    "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
                ));
                text
            }
        }
    }

    /// The literal text of the token that ends an answer, where the template fixes it; `None`
    /// for a plain template without `stop`, whose stop token depends on the vocabulary.
    pub fn stop_text(&self) -> Option<&str> {
        match self {
            Self::Plain { stop } => stop.as_deref(),
            Self::ChatGlm2 | Self::ChatGlm3 => Some(CHATGLM_STOP),
            Self::ChatMl { .. } => Some(CHATML_STOP),
        }
    }

    /// Every token generation stops at: the one [`ChatTemplate::stop_token_id`] gives first,
    /// then ChatGLM3's `<|user|>` and `<|observation|>`.
    pub fn stop_token_ids(&self, tokenizer: &TextTokenizer) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.stop_token_id(tokenizer)?.into_iter().collect();
        if let Self::ChatGlm3 = self {
            for token in CHATGLM3_EXTRA_STOPS {
                ids.push(self.token_id(tokenizer, token)?);
            }
        }
        Ok(ids)
    }

    /// The id of a special token the template writes by name.
    pub(crate) fn token_id(&self, tokenizer: &TextTokenizer, token: &'static str) -> Result<u32> {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| Error::MissingTemplateToken {
                path: tokenizer.path().to_path_buf(),
                template: self.name(),
                token,
                family: match self {
                    Self::ChatGlm2 => "ChatGLM2",
                    Self::ChatGlm3 => "ChatGLM3",
                    _ => "matching",
                },
            })
    }

    /// The id of the token that ends an answer (the one training appends and generation stops
    /// at); `None` only for a plain template without `stop` over a vocabulary with none of
    /// [`EOS_CANDIDATES`].
    pub fn stop_token_id(&self, tokenizer: &TextTokenizer) -> Result<Option<u32>> {
        match self.stop_text() {
            Some(token) => match tokenizer.token_to_id(token) {
                Some(id) => Ok(Some(id)),
                None => Err(Error::MissingStopToken {
                    path: tokenizer.path().to_path_buf(),
                    template: self.name(),
                    token: token.to_string(),
                }),
            },
            None => Ok(EOS_CANDIDATES
                .iter()
                .find_map(|token| tokenizer.token_to_id(token))),
        }
    }
}

impl FromStr for ChatTemplate {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_paths::{chatglm_tokenizer, smollm2_tokenizer, stories_tokenizer};

    #[test]
    fn plain_renders_the_prompt_as_is() {
        let t = ChatTemplate::parse("plain").unwrap();
        assert_eq!(t.render_prompt("Hi.\n"), "Hi.\n");
        assert_eq!(t.stop_text(), None);
    }

    #[test]
    fn chatglm2_renders_prefix_and_round_one() {
        let t = ChatTemplate::parse("chatglm2").unwrap();
        assert_eq!(
            t.render_prompt("你好"),
            "[gMASK]sop[Round 1]\n\n问：你好\n\n答："
        );
        assert_eq!(
            t.prompt_segments("你好"),
            vec![
                Segment::Token("[gMASK]"),
                Segment::Token("sop"),
                Segment::Text("[Round 1]\n\n问：你好\n\n答：".into())
            ]
        );
        assert_eq!(t.stop_text(), Some("</s>"));
        assert_eq!(t.response_prefix(), None);
    }

    #[test]
    fn chatglm3_renders_user_turn_and_opens_assistant_turn() {
        let t = ChatTemplate::parse("chatglm3").unwrap();
        assert_eq!(
            t.render_prompt("你好"),
            "[gMASK]sop<|user|>\n你好<|assistant|>"
        );
        assert_eq!(t.stop_text(), Some("</s>"));
        assert_eq!(t.response_prefix(), Some("\n"));
        assert_eq!(t.kept_segments(), 4);
    }

    #[test]
    fn chatglm_tokens_come_from_the_chatglm_vocabulary() {
        let (_dir, glm) = chatglm_tokenizer(64);
        let t = ChatTemplate::ChatGlm3;
        // `</s>`, then `<|user|>` and `<|observation|>`, past the 264 pieces.
        assert_eq!(t.stop_token_ids(&glm).unwrap(), vec![2, 270, 272]);
        assert_eq!(
            ChatTemplate::ChatGlm2.stop_token_ids(&glm).unwrap(),
            vec![2]
        );
        let err = t.stop_token_ids(&stories_tokenizer(64)).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                Error::MissingTemplateToken {
                    token: "<|user|>",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("stories260K") && msg.contains("ChatGLM3"),
            "{msg}"
        );
    }

    #[test]
    fn chatml_renders_user_turn_and_opens_assistant_turn() {
        let t = ChatTemplate::parse("chatml").unwrap();
        assert_eq!(
            t.render_prompt("What is 2+2?"),
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.stop_text(), Some("<|im_end|>"));
    }

    #[test]
    fn chatml_renders_system_turn_first() {
        let t = ChatTemplate::parse("chatml")
            .unwrap()
            .with_system("Be brief.")
            .unwrap();
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                system: Some("Be brief.".into())
            }
        );
        assert_eq!(
            t.render_prompt("Hi"),
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn options_on_the_wrong_template_are_errors() {
        let err = ChatTemplate::parse("plain")
            .unwrap()
            .with_system("x")
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                Error::UnsupportedTemplateOption {
                    template: "plain",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("system message"), "{msg}");
        assert!(msg.contains("\"chatml\""), "{msg}");

        let err = ChatTemplate::ChatGlm2.with_stop("</s>").unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnsupportedTemplateOption {
                    template: "chatglm2",
                    ..
                }
            ),
            "{err}"
        );
        let t = ChatTemplate::parse("plain")
            .unwrap()
            .with_stop("###")
            .unwrap();
        assert_eq!(t.stop_text(), Some("###"));
    }

    #[test]
    fn parse_round_trips_names_and_lists_known_names() {
        for name in ChatTemplate::NAMES {
            assert_eq!(ChatTemplate::parse(name).unwrap().name(), name);
            assert_eq!(name.parse::<ChatTemplate>().unwrap().name(), name);
        }
        let err = ChatTemplate::parse("chat_ml").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::UnknownChatTemplate { .. }), "{msg}");
        assert!(msg.contains("\"chat_ml\""), "{msg}");
        assert!(
            msg.contains("\"plain\", \"chatglm2\", \"chatglm3\", \"chatml\""),
            "{msg}"
        );
    }

    #[test]
    fn serde_uses_the_short_names() {
        let json = |t: &ChatTemplate| serde_json::to_string(t).unwrap();
        assert_eq!(json(&ChatTemplate::ChatGlm2), "\"chatglm2\"");
        assert_eq!(json(&ChatTemplate::ChatGlm3), "\"chatglm3\"");
        assert_eq!(json(&ChatTemplate::Plain { stop: None }), "{\"plain\":{}}");
        let chatml = ChatTemplate::ChatMl {
            system: Some("S".into()),
        };
        assert_eq!(json(&chatml), "{\"chatml\":{\"system\":\"S\"}}");
        for t in [
            ChatTemplate::ChatGlm2,
            ChatTemplate::ChatGlm3,
            ChatTemplate::Plain { stop: None },
            ChatTemplate::Plain {
                stop: Some("</s>".into()),
            },
            chatml,
        ] {
            let back: ChatTemplate = serde_json::from_str(&json(&t)).unwrap();
            assert_eq!(back, t);
        }
        let typo = serde_json::from_str::<ChatTemplate>("{\"chatml\":{\"sytem\":\"S\"}}");
        assert!(typo.is_err());
    }

    #[test]
    fn stop_ids_come_from_the_vocabulary() {
        let stories = stories_tokenizer(64);
        let smollm2 = smollm2_tokenizer(64);
        let plain = ChatTemplate::parse("plain").unwrap();
        // Llama's `</s>` and SmolLM2's `<|endoftext|>`.
        assert_eq!(plain.stop_token_id(&stories).unwrap(), Some(2));
        assert_eq!(plain.stop_token_id(&smollm2).unwrap(), Some(0));
        assert_eq!(
            ChatTemplate::ChatGlm2.stop_token_id(&stories).unwrap(),
            Some(2)
        );
        let chatml = ChatTemplate::parse("chatml").unwrap();
        assert_eq!(chatml.stop_token_id(&smollm2).unwrap(), Some(2));

        let err = chatml.stop_token_id(&stories).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::MissingStopToken { .. }), "{msg}");
        assert!(msg.contains("<|im_end|>"), "{msg}");
        assert!(msg.contains("stories260K"), "{msg}");
    }
}
