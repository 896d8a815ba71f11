//! Tokenisation of stage-1 and stage-2 rows with the model's tokenizer and templates, and
//! truncation that never cuts the template: over-long prompt and response texts keep their head
//! and tail around a marker, so the label position always survives.

use anyhow::{Result, bail};
use gram_core::{GramTokenizer, LabelIds, Templates};

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
    let enc = tok.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
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
    let head_end = if head == 0 { 0 } else { floor(offs[head].0.min(text.len())) };
    let tail_start = if tail == 0 { text.len() } else { ceil(offs[n - tail].0.min(text.len())) };
    if tail_start <= head_end {
        return Ok(text.to_string());
    }
    Ok(format!("{}{MARKER}{}", &text[..head_end], &text[tail_start..]))
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
        return Ok(Tokens { ids, prompt_len, truncated: false, full_len });
    }
    let counts: Vec<usize> = texts.iter().map(|t| tok.encode(t, false).map(|v| v.len())).collect::<gram_core::Result<_>>()?;
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
            if counts.iter().map(|&n| n.min(mid)).sum::<usize>() <= budget { lo = mid } else { hi = mid - 1 }
        }
        for (i, t) in texts.iter().enumerate() {
            cur[i] = if counts[i] > lo { cut(tok, t, lo)? } else { t.to_string() };
        }
        let (ids, prompt_len) = render(&cur)?;
        if ids.len() <= max_tokens {
            return Ok(Tokens { ids, prompt_len, truncated: true, full_len });
        }
        overflow += ids.len() - max_tokens + 4;
    }
    bail!("does not fit in {max_tokens} tokens (the template alone needs about {fixed})")
}

/// Tokenises examples for one tokenizer and prompt style.
pub struct Tokenizer<'t> {
    tok: &'t GramTokenizer,
    templates: Templates<'t>,
    /// The label token ids.
    pub labels: LabelIds,
    max_tokens: usize,
}

impl<'t> Tokenizer<'t> {
    /// `max_tokens` bounds every example.
    pub fn new(tok: &'t GramTokenizer, templates: Templates<'t>, max_tokens: usize) -> Result<Self> {
        let labels = LabelIds::resolve(tok)?;
        Ok(Self { tok, templates, labels, max_tokens })
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
        fit(self.tok, [x, a, b], self.max_tokens.saturating_sub(1), |t| {
            let ids = self.templates.encode(&self.templates.stage2(&t[0], &t[1], &t[2])?, true)?;
            let n = ids.len();
            Ok((ids, n))
        })
    }
}
