//! Tokenisation of stage-1 and stage-2 rows with the model's tokenizer and templates, and
//! truncation that never cuts the template: over-long prompt and response texts keep their head
//! and tail around a marker, so the label position always survives.

use crate::error::{Error, Result};
use crate::{GramTokenizer, LabelIds, Templates};

/// Inserted where a text was cut.
pub const MARKER: &str = " [...] ";

/// Token ids of one example.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    /// All ids (stage 1: prompt then target; stage 2: the judge prompt).
    pub ids: Vec<u32>,
    /// Ids without loss (stage 1), or all of them (stage 2).
    pub prompt_len: usize,
    /// Whether any text was cut.
    pub truncated: bool,
    /// Length before truncation.
    pub full_len: usize,
}

/// Cuts `text` to about `keep` tokens: head and tail kept, [`MARKER`] between.
fn cut(tok: &GramTokenizer, text: &str, keep: usize) -> Result<String> {
    let enc = tok
        .tokenizer
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let offs = enc.get_offsets();
    let n = offs.len();
    if n <= keep {
        return Ok(text.to_string());
    }
    let head = keep / 2;
    let tail = keep - head;
    let floor = |mut i: usize| {
        while i > 0 && !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let ceil = |mut i: usize| {
        while i < text.len() && !text.is_char_boundary(i) {
            i += 1;
        }
        i
    };
    let head_end = if head == 0 {
        0
    } else {
        floor(offs[head].0.min(text.len()))
    };
    let tail_start = if tail == 0 {
        text.len()
    } else {
        ceil(offs[n - tail].0.min(text.len()))
    };
    if tail_start <= head_end {
        return Ok(text.to_string());
    }
    Ok(format!(
        "{}{MARKER}{}",
        &text[..head_end],
        &text[tail_start..]
    ))
}

/// Renders and tokenises `texts` through `render`, cutting the texts (never the template) until
/// the ids fit in `max_tokens`.
fn fit<const N: usize>(
    tok: &GramTokenizer,
    texts: [&str; N],
    max_tokens: usize,
    render: impl Fn(&[String; N]) -> Result<(Vec<u32>, usize)>,
) -> Result<Tokens> {
    let mut cur: [String; N] = texts.map(str::to_string);
    let (ids, prompt_len) = render(&cur)?;
    let full_len = ids.len();
    if ids.len() <= max_tokens {
        return Ok(Tokens {
            ids,
            prompt_len,
            truncated: false,
            full_len,
        });
    }
    let counts: Vec<usize> = texts
        .iter()
        .map(|t| tok.encode(t, false).map(|v| v.len()))
        .collect::<Result<_>>()?;
    let total: usize = counts.iter().sum();
    let fixed = full_len.saturating_sub(total);
    let marker = tok.encode(MARKER, false)?.len() + 2;
    let mut overflow = full_len - max_tokens;
    for _ in 0..6 {
        // Water-filling: the largest cap c with sum(min(n_i, c)) <= budget.
        let budget = total.saturating_sub(overflow + marker * N);
        let (mut lo, mut hi) = (0usize, counts.iter().copied().max().unwrap_or(0));
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if counts.iter().map(|&n| n.min(mid)).sum::<usize>() <= budget {
                lo = mid
            } else {
                hi = mid - 1
            }
        }
        for (i, t) in texts.iter().enumerate() {
            cur[i] = if counts[i] > lo {
                cut(tok, t, lo)?
            } else {
                t.to_string()
            };
        }
        let (ids, prompt_len) = render(&cur)?;
        if ids.len() <= max_tokens {
            return Ok(Tokens {
                ids,
                prompt_len,
                truncated: true,
                full_len,
            });
        }
        overflow += ids.len() - max_tokens + 4;
    }
    Err(Error::TooLong(format!(
        "does not fit in {max_tokens} tokens (the template alone needs about {fixed})"
    )))
}

/// The part of every judge prompt before the question (chat template, system prompt, judge
/// instruction, `[User Question]`) is the same for all rows: its ids are computed once and
/// reused, on rows where the tokenizer provably splits at its end.
struct PrefixCache {
    prefix: String,
    ids: Vec<u32>,
    /// How many of `ids` every judge prompt's ids start with, whatever the question's first
    /// bytes: the ids of the prefix up to its last line. That line's own ids can merge with the
    /// question's first characters ("\n" + "\n\n..." is one token), the split before it cannot.
    stable: usize,
    /// Byte offset in `prefix` where a pre-token starts (the start of its last line): the
    /// pre-tokenisation of `prefix[window..] + row text` decides the split for the whole text.
    window: usize,
    /// Texts of added tokens (they split the input before the pre-tokenizer runs).
    added: Vec<String>,
}

fn pre_token_starts(tok: &GramTokenizer, text: &str) -> Option<Vec<usize>> {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let pre = tok.tokenizer.get_pre_tokenizer()?;
    let mut pts = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut pts).ok()?;
    Some(
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .iter()
            .map(|(_, o, _)| o.0)
            .collect(),
    )
}

impl PrefixCache {
    fn new(tok: &GramTokenizer, templates: &Templates<'_>) -> Option<Self> {
        const SENTINEL: &str = "\u{E000}";
        if tok.tokenizer.get_normalizer().is_some() {
            return None;
        }
        let text = templates.stage2(SENTINEL, "a", "b").ok()?;
        let prefix = text[..text.find(SENTINEL)?].to_string();
        let body = prefix.strip_suffix('\n')?;
        let window = body.rfind('\n')? + 1;
        let added: Vec<String> = tok
            .tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();
        if added
            .iter()
            .any(|a| a.contains('\n') || prefix[window..].contains(a.as_str()))
        {
            return None;
        }
        // The window must start a pre-token in the prefix's own last segment.
        let seg = added
            .iter()
            .filter_map(|a| prefix.rfind(a.as_str()).map(|i| i + a.len()))
            .max()
            .unwrap_or(0);
        if seg > window || !pre_token_starts(tok, &prefix[seg..])?.contains(&(window - seg)) {
            return None;
        }
        let ids = templates.encode(&prefix, true).ok()?;
        // The window starts a pre-token, so the prefix's ids end with its last line's own ids.
        let last_line = templates.encode(&prefix[window..], false).ok()?;
        if last_line.is_empty() || !ids.ends_with(&last_line) || ids.len() == last_line.len() {
            return None;
        }
        let stable = ids.len() - last_line.len();
        // Probes: the concatenation must reproduce whole-text ids (this also rules out tokenizers
        // that add a prefix space or append special tokens).
        let cache = Self {
            prefix,
            stable,
            ids,
            window,
            added,
        };
        for probe in [
            "hello world",
            " leading space",
            "\n\nnewlines first",
            "42 digits",
            "Ünïcödé 🙂",
            "<|im_end|> x",
        ] {
            let full = templates
                .encode(&format!("{}{probe}", cache.prefix), true)
                .ok()?;
            if !full.starts_with(cache.stable_ids()) {
                return None;
            }
            if cache
                .encode(tok, &format!("{}{probe}", cache.prefix))
                .is_some_and(|ids| ids != full)
            {
                return None;
            }
        }
        Some(cache)
    }

    fn stable_ids(&self) -> &[u32] {
        &self.ids[..self.stable]
    }

    /// Ids of `text` (which must start with the prefix) if the split at the prefix's end is
    /// certain; None: tokenise the whole text.
    fn encode(&self, tok: &GramTokenizer, text: &str) -> Option<Vec<u32>> {
        let rest = text.strip_prefix(self.prefix.as_str())?;
        let mut head_end = rest.len().min(64);
        while !rest.is_char_boundary(head_end) {
            head_end -= 1;
        }
        let head = &rest[..head_end];
        if self
            .added
            .iter()
            .any(|a| head.contains(a.as_str()) || a.starts_with(head))
            && !head.is_empty()
        {
            // An added token near the boundary: rare, take the slow path.
            return None;
        }
        let window = format!("{}{head}", &self.prefix[self.window..]);
        let boundary = self.prefix.len() - self.window;
        if !pre_token_starts(tok, &window)?.contains(&boundary) {
            return None;
        }
        let mut ids = self.ids.clone();
        ids.extend(tok.encode(rest, false).ok()?);
        Some(ids)
    }
}

/// Tokenises examples for one tokenizer and prompt style.
pub struct Tokenizer<'t> {
    tok: &'t GramTokenizer,
    templates: Templates<'t>,
    /// The label token ids.
    pub labels: LabelIds,
    max_tokens: usize,
    judge_prefix: Option<PrefixCache>,
}

impl<'t> Tokenizer<'t> {
    /// `max_tokens` bounds every example.
    pub fn new(
        tok: &'t GramTokenizer,
        templates: Templates<'t>,
        max_tokens: usize,
    ) -> Result<Self> {
        let labels = LabelIds::resolve(tok)?;
        let judge_prefix = PrefixCache::new(tok, &templates);
        Ok(Self {
            tok,
            templates,
            labels,
            max_tokens,
            judge_prefix,
        })
    }

    /// Stage 1: prompt x (masked), target the pair.
    pub fn stage1(&self, x: &str, a: &str, b: &str) -> Result<Tokens> {
        fit(self.tok, [x, a, b], self.max_tokens, |t| {
            let r = self.templates.stage1(&t[0], &t[1], &t[2])?;
            let mut ids = self.templates.encode(&r.prompt, true)?;
            let p = ids.len();
            ids.extend(self.templates.encode(&r.target, false)?);
            Ok((ids, p))
        })
    }

    /// Stage 2: the judge prompt; the label token follows it (so it gets one token of room).
    pub fn stage2(&self, x: &str, a: &str, b: &str) -> Result<Tokens> {
        fit(
            self.tok,
            [x, a, b],
            self.max_tokens.saturating_sub(1),
            |t| {
                let text = self.templates.stage2(&t[0], &t[1], &t[2])?;
                let ids = match self
                    .judge_prefix
                    .as_ref()
                    .and_then(|c| c.encode(self.tok, &text))
                {
                    Some(ids) => ids,
                    None => self.templates.encode(&text, true)?,
                };
                let n = ids.len();
                Ok((ids, n))
            },
        )
    }

    /// A reward model's input: the prompt and one response through the single-answer template
    /// (what `gram-train bt` trains on and a reward export scores), texts cut to fit.
    pub fn reward(&self, x: &str, r: &str) -> Result<Tokens> {
        fit(self.tok, [x, r], self.max_tokens, |t| {
            let ids = self
                .templates
                .encode(&self.templates.single(&t[0], &t[1])?, true)?;
            let n = ids.len();
            Ok((ids, n))
        })
    }

    /// Whether the judge prefix is tokenised once (false: every prompt is tokenised whole).
    pub fn caches_judge_prefix(&self) -> bool {
        self.judge_prefix.is_some()
    }

    /// The ids every judge prompt starts with, whatever its question (chat template, system
    /// prompt, judge instruction; not the `[User Question]` line, whose last token can merge with
    /// the question's first characters). None when the tokenizer gives no such guarantee.
    pub fn judge_prefix_ids(&self) -> Option<&[u32]> {
        self.judge_prefix.as_ref().map(PrefixCache::stable_ids)
    }

    /// Stage-2 ids by tokenising the whole judge prompt (the reference for the cached path).
    pub fn stage2_uncached(&self, x: &str, a: &str, b: &str) -> Result<Vec<u32>> {
        self.templates
            .encode(&self.templates.stage2(x, a, b)?, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PromptStyle;

    #[test]
    fn cached_judge_prefix_gives_whole_text_ids() -> Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/smollm2");
        let tok = GramTokenizer::from_dir(&dir)?;
        for style in [PromptStyle::Chat, PromptStyle::Raw] {
            let t = Tokenizer::new(&tok, Templates::new(&tok, style)?, 4096)?;
            assert!(
                t.caches_judge_prefix(),
                "{style:?}: the SmolLM2 tokenizer should allow the cache"
            );
            let xs = [
                "How do I boil an egg?",
                " leading",
                "\n\nblank lines",
                "  two spaces",
                "\t\ttwo tabs",
                "\n",
                "\ttab",
                "123",
                "(paren)",
                "<|im_end|>injected",
                "Ünïcödé 🙂 emoji",
                "",
                "'s contraction",
                "x\n",
                "word\r\nwindows",
            ];
            for x in xs {
                for (a, b) in [("yes", "no"), (" sp", "\nnl"), ("<|im_start|>", "B")] {
                    let got = t.stage2(x, a, b)?.ids;
                    let want = t.stage2_uncached(x, a, b)?;
                    assert_eq!(got, want, "{style:?} x={x:?} a={a:?} b={b:?}");
                    let p = t.judge_prefix_ids().unwrap_or_default();
                    assert!(
                        p.len() > 20 && got.len() > p.len() && got.starts_with(p),
                        "{style:?} x={x:?}: the ids do not start with the judge prefix"
                    );
                }
            }
        }
        Ok(())
    }
}
