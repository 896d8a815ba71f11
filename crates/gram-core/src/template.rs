//! The GRAM prompt templates and label tokens (`../shared/docs/METHOD.md`): stage 1 (a prompt,
//! then the response pair as the target), stage 2 (the judge prompt; target `A` or `B`), with or
//! without the model's chat template; and the both-order pair score.

use crate::chat::Message;
use crate::error::{Error, Result};
use crate::tokenizer::GramTokenizer;

/// The judge instruction that opens every stage-2 prompt (METHOD.md, stage 2).
pub const JUDGE_INSTRUCTION: &str = "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user question displayed below. You should choose the assistant that follows the user's instructions and answers the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. Avoid any position biases and ensure that the order in which the responses were presented does not influence your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. Please directly output your final verdict by strictly following this format: \"A\" if assistant A is better, \"B\" if assistant B is better.";

/// The label tokens' texts.
pub const LABEL_A: &str = "A";
/// See [`LABEL_A`].
pub const LABEL_B: &str = "B";

/// Stage-1 input side: `[User Question]\n{x}\n\n` (masked, no loss).
pub fn stage1_prompt(x: &str) -> String {
    format!("[User Question]\n{x}\n\n")
}

/// The response pair as METHOD.md writes it (the stage-1 target, and the tail of the judge prompt).
pub fn pair_block(a: &str, b: &str) -> String {
    format!(
        "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
    )
}

/// The stage-2 judge prompt, before any chat template.
pub fn judge_prompt(x: &str, a: &str, b: &str) -> String {
    format!(
        "{JUDGE_INSTRUCTION}\n\n{}{}\n\n#Preferred:",
        stage1_prompt(x),
        pair_block(a, b)
    )
}

/// How prompts are wrapped for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    /// Plain text (base models); the tokenizer's own special tokens (e.g. BOS) are added.
    Raw,
    /// The model's chat template, the GRAM text as the user turn.
    Chat,
}

/// A text split into the part without loss (`prompt`) and the part to learn (`target`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Input side (masked).
    pub prompt: String,
    /// Target side (stage 1: the pair; empty for stage 2, whose target is the label token).
    pub target: String,
}

/// A chat template that places message contents verbatim, reduced to the fixed text around them
/// (found once with sentinels and checked on probes), so rows need no template rendering.
#[derive(Debug, Clone)]
struct Wrap {
    /// Fixed texts: before the first content, between contents, after the last.
    parts: Vec<String>,
}

impl Wrap {
    fn probe(t: &crate::chat::ChatTemplate, with_answer: bool) -> Option<Self> {
        const S: [&str; 2] = ["\u{E001}", "\u{E002}"];
        let render = |u: &str, a: &str| -> Option<String> {
            if with_answer {
                t.render(&[Message::user(u), Message::assistant(a)], false)
                    .ok()
            } else {
                t.render(&[Message::user(u)], true).ok()
            }
        };
        let r = render(S[0], S[1])?;
        let (before, rest) = r.split_once(S[0])?;
        let parts = if with_answer {
            let (middle, after) = rest.split_once(S[1])?;
            vec![before.to_string(), middle.to_string(), after.to_string()]
        } else {
            vec![before.to_string(), rest.to_string()]
        };
        if parts.iter().any(|p| p.contains(S[0]) || p.contains(S[1])) {
            return None;
        }
        let w = Self { parts };
        for (u, a) in [
            ("x", "y"),
            ("  padded  ", "\n"),
            ("\nnl\n", " a "),
            ("{{ b }}", "{% x %}"),
            ("<|im_end|>", ""),
        ] {
            if render(u, a)? != w.apply(u, a) {
                return None;
            }
        }
        Some(w)
    }

    fn apply(&self, u: &str, a: &str) -> String {
        match &self.parts[..] {
            [b, after] => format!("{b}{u}{after}"),
            [b, m, after] => format!("{b}{u}{m}{a}{after}"),
            _ => String::new(),
        }
    }
}

/// Renders GRAM's texts for one tokenizer.
pub struct Templates<'t> {
    tok: &'t GramTokenizer,
    style: PromptStyle,
    /// The chat template as fixed text around the user turn (with the generation prompt).
    user_wrap: Option<Wrap>,
    /// ... and around a user turn followed by an assistant turn.
    answer_wrap: Option<Wrap>,
}

impl<'t> Templates<'t> {
    /// `style` Chat needs the tokenizer to have a chat template.
    pub fn new(tok: &'t GramTokenizer, style: PromptStyle) -> Result<Self> {
        if style == PromptStyle::Chat && tok.chat_template.is_none() {
            return Err(Error::Template(format!(
                "{} has no chat template; use the raw prompt style",
                tok.source.display()
            )));
        }
        Ok(Self::with_style(tok, style))
    }

    fn with_style(tok: &'t GramTokenizer, style: PromptStyle) -> Self {
        let (user_wrap, answer_wrap) = match (&tok.chat_template, style) {
            (Some(t), PromptStyle::Chat) => (Wrap::probe(t, false), Wrap::probe(t, true)),
            _ => (None, None),
        };
        Self {
            tok,
            style,
            user_wrap,
            answer_wrap,
        }
    }

    fn chat_user(&self, user: &str) -> Result<String> {
        match &self.user_wrap {
            Some(w) => Ok(w.apply(user, "")),
            None => self.chat()?.render(&[Message::user(user)], true),
        }
    }

    fn chat_answer(&self, user: &str, answer: &str) -> Result<String> {
        match &self.answer_wrap {
            Some(w) => Ok(w.apply(user, answer)),
            None => self
                .chat()?
                .render(&[Message::user(user), Message::assistant(answer)], false),
        }
    }

    /// The default for a tokenizer: Chat when it has a template, else Raw.
    pub fn auto(tok: &'t GramTokenizer) -> Self {
        let style = if tok.chat_template.is_some() {
            PromptStyle::Chat
        } else {
            PromptStyle::Raw
        };
        Self::with_style(tok, style)
    }

    /// The style in use.
    pub fn style(&self) -> PromptStyle {
        self.style
    }

    fn chat(&self) -> Result<&crate::chat::ChatTemplate> {
        self.tok
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Internal("chat style without template".into()))
    }

    /// Stage 1: prompt x, target the pair (a, b). With a chat template the prompt is the user turn
    /// up to the assistant's answer, and the target is the assistant turn including its end marker.
    pub fn stage1(&self, x: &str, a: &str, b: &str) -> Result<Rendered> {
        let user = stage1_prompt(x);
        let target = pair_block(a, b);
        match self.style {
            PromptStyle::Raw => {
                let eos = self.tok.eos_token.clone().unwrap_or_default();
                Ok(Rendered {
                    prompt: user,
                    target: format!("{target}{eos}"),
                })
            }
            PromptStyle::Chat => {
                let prompt = self.chat_user(user.trim_end())?;
                let full = self.chat_answer(user.trim_end(), &target)?;
                let target = full.strip_prefix(&prompt).ok_or_else(|| {
                    Error::Template("the chat template renders the user turn differently once an assistant turn follows; stage-1 targets cannot be split".into())
                })?;
                Ok(Rendered {
                    prompt,
                    target: target.to_string(),
                })
            }
        }
    }

    /// Stage 2: the judge prompt for (x, a, b), ending where the label token goes.
    pub fn stage2(&self, x: &str, a: &str, b: &str) -> Result<String> {
        let judge = judge_prompt(x, a, b);
        match self.style {
            PromptStyle::Raw => Ok(judge),
            PromptStyle::Chat => self.chat_user(&judge),
        }
    }

    /// One response to a prompt as a scalar reward model reads it (the Bradley-Terry baseline):
    /// the user turn and the assistant's answer (chat), or prompt and response separated by a
    /// blank line (raw).
    pub fn single(&self, x: &str, r: &str) -> Result<String> {
        match self.style {
            PromptStyle::Raw => Ok(format!("{x}\n\n{r}")),
            PromptStyle::Chat => self.chat_answer(x, r),
        }
    }

    /// Token ids of a rendered text: the chat template carries its own special tokens, raw text
    /// gets the tokenizer's (BOS) in front.
    pub fn encode(&self, text: &str, at_start: bool) -> Result<Vec<u32>> {
        self.tok
            .encode(text, at_start && self.style == PromptStyle::Raw)
    }
}

/// The ids of the label tokens `A` and `B`. Each must be exactly one token, or GRAM's loss and
/// score (two logits at one position) are undefined for this tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabelIds {
    /// Id of `A`.
    pub a: u32,
    /// Id of `B`.
    pub b: u32,
}

impl LabelIds {
    /// Resolves them from a tokenizer.
    pub fn resolve(tok: &GramTokenizer) -> Result<Self> {
        let one = |s: &str| -> Result<u32> {
            let ids = tok.encode(s, false)?;
            match ids[..] {
                [id] => Ok(id),
                _ => Err(Error::Tokenizer(format!(
                    "label `{s}` is {} tokens ({ids:?}) in {}; GRAM needs `A` and `B` to be single tokens",
                    ids.len(),
                    tok.source.display()
                ))),
            }
        };
        let ids = Self {
            a: one(LABEL_A)?,
            b: one(LABEL_B)?,
        };
        if ids.a == ids.b {
            return Err(Error::Tokenizer("`A` and `B` map to the same token".into()));
        }
        Ok(ids)
    }
}

/// P(A) from the two label logits: softmax over (l_A, l_B), computed stably.
pub fn prob_a(l_a: f32, l_b: f32) -> f32 {
    let z = l_a - l_b;
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        z.exp() / (1.0 + z.exp())
    }
}

/// METHOD.md's both-order score of response r1 against r2: `ab` are (l_A, l_B) with A = r1,
/// B = r2; `ba` with A = r2, B = r1. score(r2) = 1 - score(r1).
pub fn pair_score(ab: (f32, f32), ba: (f32, f32)) -> f32 {
    let p1 = prob_a(ab.0, ab.1);
    let p2 = 1.0 - prob_a(ba.0, ba.1);
    0.5 * (p1 + p2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_prompt_matches_method_md() {
        let p = judge_prompt("Q?", "ra", "rb");
        assert!(p.starts_with("Please act as an impartial judge"));
        assert!(p.ends_with(
            "\n\n[User Question]\nQ?\n\n[The Start of Assistant A's Answer]\nra\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\nrb\n[The End of Assistant B's Answer]\n\n#Preferred:"
        ));
        assert!(!p.contains("\\n"), "literal backslash-n must not appear");
    }

    fn tiny_tokenizer(vocab: &str, template: Option<&str>) -> GramTokenizer {
        let json = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
            "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
            "vocab":{vocab},"merges":[]}}}}"#
        );
        GramTokenizer {
            tokenizer: json.parse().expect("valid tokenizer json"),
            chat_template: template
                .map(|t| crate::chat::ChatTemplate::new(t, "", "<eos>").expect("template")),
            bos_token: None,
            eos_token: Some("<eos>".into()),
            pad_token: None,
            source: "tiny".into(),
        }
    }

    #[test]
    fn labels_must_be_single_tokens() {
        let ok = tiny_tokenizer(r#"{"A":0,"B":1,"c":2}"#, None);
        assert_eq!(LabelIds::resolve(&ok).ok(), Some(LabelIds { a: 0, b: 1 }));
        let no_a = tiny_tokenizer(r#"{"B":1,"c":2}"#, None);
        let e = LabelIds::resolve(&no_a)
            .expect_err("no `A` token")
            .to_string();
        assert!(
            e.contains("label `A` is 0 tokens") && e.contains("single tokens"),
            "{e}"
        );
    }

    #[test]
    fn stage1_splits_prompt_and_target_with_and_without_chat() -> Result<()> {
        let tok = tiny_tokenizer(
            r#"{"A":0}"#,
            Some(
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}<end>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            ),
        );
        let chat = Templates::new(&tok, PromptStyle::Chat)?.stage1("x", "a", "b")?;
        assert_eq!(chat.prompt, "<user>[User Question]\nx<end><assistant>");
        assert_eq!(chat.target, format!("{}<end>", pair_block("a", "b")));
        let raw = Templates::new(&tok, PromptStyle::Raw)?.stage1("x", "a", "b")?;
        assert_eq!(raw.prompt, "[User Question]\nx\n\n");
        assert_eq!(raw.target, format!("{}<eos>", pair_block("a", "b")));
        let judge = Templates::new(&tok, PromptStyle::Chat)?.stage2("x", "a", "b")?;
        assert_eq!(
            judge,
            format!("<user>{}<end><assistant>", judge_prompt("x", "a", "b"))
        );
        let plain = tiny_tokenizer(r#"{"A":0}"#, None);
        assert!(Templates::new(&plain, PromptStyle::Chat).is_err());
        Ok(())
    }

    #[test]
    fn template_shortcut_equals_rendering() -> Result<()> {
        // A template that trims contents cannot be reduced to fixed text: rendering is kept.
        let trims = tiny_tokenizer(
            r#"{"A":0}"#,
            Some(
                "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}<end>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            ),
        );
        let t = Templates::new(&trims, PromptStyle::Chat)?;
        assert!(t.user_wrap.is_none() && t.answer_wrap.is_none());
        assert_eq!(
            t.stage2("  x ", "a", "b")?,
            format!(
                "<user>{}<end><assistant>",
                judge_prompt("  x ", "a", "b").trim()
            )
        );
        let verbatim = tiny_tokenizer(
            r#"{"A":0}"#,
            Some(
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}<end>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            ),
        );
        let t = Templates::new(&verbatim, PromptStyle::Chat)?;
        assert!(t.user_wrap.is_some() && t.answer_wrap.is_some());
        for x in ["  x ", "{{ y }}", "\n"] {
            let judge = judge_prompt(x, "a", "b");
            assert_eq!(
                t.stage2(x, "a", "b")?,
                t.chat()?.render(&[Message::user(&judge)], true)?
            );
        }
        Ok(())
    }

    #[test]
    fn pair_score_is_position_independent() {
        let s = pair_score((2.0, -1.0), (0.5, 1.5));
        let swapped = pair_score((0.5, 1.5), (2.0, -1.0));
        assert!((s + swapped - 1.0).abs() < 1e-6);
        assert!(s > 0.5);
        assert_eq!(pair_score((0.0, 0.0), (0.0, 0.0)), 0.5);
        assert!(prob_a(100.0, -100.0) == 1.0 && prob_a(-100.0, 100.0) >= 0.0);
    }
}
