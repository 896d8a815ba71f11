//! Where a policy's query divides into its prompt and its response, and the chat markup a
//! policy model wraps them in.

use std::path::Path;

use gram_core::GramTokenizer;
use gram_core::chat::Message;

/// Share of a prompt (in bytes, after whitespace normalisation) that must open a query for the
/// rest to count as the response, when the whole prompt does not (trainers cut long prompts).
const MIN_SHARED: f64 = 0.5;

/// The response in `query` after `prompt`: the query with its longest common prefix with the
/// prompt cut off, where runs of whitespace match runs of whitespace. The split is refused,
/// with the reason, when less than half of the prompt opens the query.
pub fn response<'q>(query: &'q str, prompt: &str) -> Result<&'q str, String> {
    if let Some(rest) = query.strip_prefix(prompt) {
        return Ok(rest);
    }
    let (mut q, mut p) = (
        query.char_indices().peekable(),
        prompt.char_indices().peekable(),
    );
    // Byte offsets just past the matched part of each.
    let (mut q_end, mut p_end) = (0, 0);
    loop {
        match (q.peek().copied(), p.peek().copied()) {
            (Some((_, a)), Some((_, b))) if a.is_whitespace() && b.is_whitespace() => {
                while let Some((i, c)) = q.peek().copied().filter(|(_, c)| c.is_whitespace()) {
                    q_end = i + c.len_utf8();
                    q.next();
                }
                while let Some((i, c)) = p.peek().copied().filter(|(_, c)| c.is_whitespace()) {
                    p_end = i + c.len_utf8();
                    p.next();
                }
            }
            (Some((i, a)), Some((j, b))) if a == b => {
                q_end = i + a.len_utf8();
                p_end = j + b.len_utf8();
                q.next();
                p.next();
            }
            // A prompt's trailing whitespace that the query lacks.
            (_, Some((_, b))) if b.is_whitespace() && prompt[p_end..].trim().is_empty() => {
                p_end = prompt.len();
                break;
            }
            _ => break,
        }
    }
    if p_end == prompt.len() || (p_end > 0 && p_end as f64 >= MIN_SHARED * prompt.len() as f64) {
        return Ok(&query[q_end..]);
    }
    Err(format!(
        "the query does not start with its prompt: they share {p_end} of the prompt's {} bytes (whitespace runs matched as equal); at least half are needed to split",
        prompt.len()
    ))
}

/// The markup a chat template puts around one user turn and the assistant's answer, to strip
/// from queries and prompts that arrive rendered.
#[derive(Debug, Clone)]
pub struct ChatMarkup {
    /// Before the user's text (with any default system turn).
    head: String,
    /// Between the user's text and the assistant's (end of turn, assistant header).
    mid: String,
    /// After the assistant's text (end of turn).
    tail: String,
    /// The end-of-sequence text a decoded response may end with.
    eos: Option<String>,
}

impl ChatMarkup {
    /// The markup of the chat template of a model folder, tokenizer folder or GGUF file.
    pub fn from_path(path: &Path) -> crate::Result<Self> {
        let err = |m: String| crate::Error::Input(format!("{}: {m}", path.display()));
        let tok = GramTokenizer::from_path(path)?;
        let t = tok
            .chat_template
            .as_ref()
            .ok_or_else(|| err("has no chat template".into()))?;
        const U: &str = "\u{E000}";
        const A: &str = "\u{E001}";
        let asked = t.render(&[Message::user(U)], true)?;
        let answered = t.render(&[Message::user(U), Message::assistant(A)], false)?;
        let (head, mid) = asked
            .split_once(U)
            .ok_or_else(|| err("its template drops the user's text".into()))?;
        let (_, tail) = answered
            .split_once(A)
            .ok_or_else(|| err("its template drops the assistant's text".into()))?;
        Ok(Self {
            head: head.to_string(),
            mid: mid.to_string(),
            tail: tail.to_string(),
            eos: tok.eos_token.clone().filter(|e| !e.is_empty()),
        })
    }

    /// `text` without the template's opening (as rendered for one user turn), the markup
    /// between the turns, and the closing end-of-turn / end-of-sequence text.
    pub fn strip(&self, text: &str) -> String {
        let mut t = text.strip_prefix(self.head.as_str()).unwrap_or(text);
        loop {
            let before = t.len();
            for end in [
                Some(self.tail.as_str()),
                Some(self.tail.trim_end()),
                self.eos.as_deref(),
            ]
            .into_iter()
            .flatten()
            .filter(|e| !e.is_empty())
            {
                t = t.strip_suffix(end).unwrap_or(t);
            }
            if t.len() == before {
                break;
            }
        }
        if self.mid.is_empty() {
            t.to_string()
        } else {
            t.replace(self.mid.as_str(), "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_split_after_their_prompt_even_when_spacing_or_length_differ() {
        assert_eq!(response("Q? A.", "Q?"), Ok(" A."));
        assert_eq!(response("anything", ""), Ok("anything"));
        // Whitespace runs match whatever they hold.
        assert_eq!(
            response("Say  hi\n\tto me\nHello", "Say hi to me "),
            Ok("Hello")
        );
        assert_eq!(response("Say hi to meHello", "Say hi to me\n"), Ok("Hello"));
        // A prompt cut by the trainer: most of it opens the query.
        assert_eq!(
            response("What is a river? It", "What is a river? Explain."),
            Ok("It")
        );
        // Too little in common: refused with the numbers.
        let e = response("abc", "zzz");
        assert!(
            e.as_ref()
                .is_err_and(|e| e.contains("share 0 of the prompt's 3 bytes")),
            "{e:?}"
        );
        assert!(response("What else", "What is a river? Explain in detail.").is_err());
        // Multi-byte characters are never split.
        assert_eq!(response("héllo wörld!", "héllo wörld"), Ok("!"));
    }

    #[test]
    fn chat_markup_comes_off_queries_and_prompts() -> crate::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/smollm2");
        let m = ChatMarkup::from_path(&dir)?;
        let tok = GramTokenizer::from_path(&dir)?;
        let t = tok
            .chat_template
            .as_ref()
            .expect("SmolLM2 has a chat template");
        let prompt = t.render(&[Message::user("Name a river.")], true)?;
        let query = format!("{prompt}The Nile.{}", m.eos.clone().unwrap_or_default());
        assert!(prompt.contains("<|im_start|>"), "{prompt:?}");
        let (p, q) = (m.strip(&prompt), m.strip(&query));
        assert_eq!(p, "Name a river.");
        assert_eq!(response(&q, &p), Ok("The Nile."));
        // Text without markup is left alone.
        assert_eq!(m.strip("plain text"), "plain text");
        Ok(())
    }
}
