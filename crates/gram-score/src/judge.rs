//! A GRAM judge behind onnxruntime: judge prompts tokenised with the export's tokenizer and
//! template (texts cut to fit, never the template), sequences sorted by length into batches
//! under a token budget (each padded to its own length rounded up, so a score does not depend
//! on the batch it ran in), batches run in parallel on a session pool, and METHOD.md's
//! both-order score.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use gram_core::export::{ExportManifest, HeadKind};
use gram_core::fit::Tokenizer;
use gram_core::template::{pair_score, prob_a};
use gram_core::{GramTokenizer, Templates};

use crate::error::{Error, Result};
use crate::runtime::{Batch, PairBatch, SessionPool, Threads, shared_len};

/// Limits of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most rows.
    pub max_rows: usize,
    /// Most tokens including padding (rows x padded width).
    pub max_tokens: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_rows: 64,
            max_tokens: 1024,
        }
    }
}

/// The both-order result for one pair (A = the first response).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScore {
    /// score(a) = (P(A | a, b) + P(B | b, a)) / 2; score(b) = 1 - score(a).
    pub score_a: f32,
    /// P(A) with a shown first.
    pub p_ab: f32,
    /// P(A) with b shown first (b's probability of winning in that order).
    pub p_ba: f32,
    /// Whether a text was cut to fit.
    pub truncated: bool,
}

impl PairScore {
    /// P(a wins) with a shown second: 1 - P(A) with b shown first.
    pub fn p_a_second(&self) -> f32 {
        1.0 - self.p_ba
    }
}

/// What scores pairs in both orders (a [`Judge`]). Jobs and best-of-n
/// see only this.
pub trait Scorer {
    /// Both-order scores of pairs (prompt, a, b); a pair that cannot be encoded gets its reason.
    fn score_pairs(
        &self,
        pairs: &[(&str, &str, &str)],
    ) -> Result<Vec<std::result::Result<PairScore, String>>>;
}

impl Scorer for Judge {
    fn score_pairs(
        &self,
        pairs: &[(&str, &str, &str)],
    ) -> Result<Vec<std::result::Result<PairScore, String>>> {
        Judge::score_pairs(self, pairs)
    }
}

/// Work done so far, for throughput and FLOP accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RunStats {
    /// Batches run.
    pub batches: u64,
    /// Sequences run.
    pub sequences: u64,
    /// Their real tokens.
    pub tokens: u64,
    /// Tokens including padding (sum of rows x width).
    pub padded_tokens: u64,
    /// Sum of rows x width x (prefix + width): the query-key pairs attention computes in a
    /// layer that runs every position.
    pub attention_cells: u64,
    /// Sum of rows x (prefix + width): the keys one query row meets (the judge graph's last
    /// layer computes only the last position's query).
    pub key_columns: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    sequences: AtomicU64,
    tokens: AtomicU64,
    padded_tokens: AtomicU64,
    attention_cells: AtomicU64,
    key_columns: AtomicU64,
}

/// A loaded export folder.
pub struct Judge {
    /// Its manifest.
    pub manifest: ExportManifest,
    /// The folder.
    pub dir: PathBuf,
    enc: Tokenizer<'static>,
    pool: SessionPool,
    /// Batch limits.
    pub limits: BatchLimits,
    counters: Counters,
}

/// Rows are padded to a multiple of this many tokens (per part of a pair graph's input).
pub const WIDTH_GRAIN: usize = 16;

/// A batch to run: its items and the widths their rows are padded to.
struct Planned<const P: usize> {
    items: Vec<usize>,
    widths: [usize; P],
}

/// Groups items, longest first, into batches under the limits. Each item is
/// `rows_per_item` rows of `widths(i)` tokens per part. An item's rows are padded to its own
/// widths rounded up to [`WIDTH_GRAIN`], and a batch holds only items of the same padded
/// widths: what the graph computes for a row then depends on the row alone, not on the rows
/// it shares a batch with, so a pair gets the same score bit for bit however the pairs
/// around it are batched (a server's requests, a job's `--batch-rows`/`--batch-tokens`).
fn batches<const P: usize>(
    limits: BatchLimits,
    n: usize,
    rows_per_item: usize,
    widths: impl Fn(usize) -> [usize; P],
) -> Vec<Planned<P>> {
    let padded: Vec<[usize; P]> = (0..n)
        .map(|i| widths(i).map(|w| w.max(1).next_multiple_of(WIDTH_GRAIN)))
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse((padded[i].iter().sum::<usize>(), padded[i])));
    let mut batches: Vec<Planned<P>> = Vec::new();
    for i in order {
        let w = padded[i];
        let cost = |rows: usize| rows * rows_per_item * w.iter().sum::<usize>();
        match batches.last_mut() {
            Some(b)
                if b.widths == w
                    && (b.items.len() + 1) * rows_per_item <= limits.max_rows
                    && cost(b.items.len() + 1) <= limits.max_tokens =>
            {
                b.items.push(i)
            }
            _ => batches.push(Planned {
                items: vec![i],
                widths: w,
            }),
        }
    }
    batches
}

/// A reward export's `(r_a, r_b, truncated)` for one pair.
pub type RewardPair = (f32, f32, bool);

/// (item, output) pairs a batch produced.
type Scored<T = [f32; 2]> = Vec<(usize, T)>;

/// Encoded pair: both orders.
struct Encoded {
    ab: Vec<u32>,
    ba: Vec<u32>,
    truncated: bool,
}

impl Judge {
    /// Opens `dir` (made by `gram-export onnx --head judge`).
    pub fn open(dir: &Path, threads: Threads, limits: BatchLimits) -> Result<Self> {
        let manifest = ExportManifest::read(dir)?;
        if !matches!(manifest.head, HeadKind::Judge | HeadKind::Reward) {
            return Err(Error::Input(format!(
                "{}: exported with --head {:?}; scoring needs --head judge (or, for eval, --head reward)",
                dir.display(),
                manifest.head
            )));
        }
        // The tokenizer lives as long as the process: the templates and the prefix cache borrow it.
        let tok: &'static GramTokenizer = Box::leak(Box::new(GramTokenizer::from_dir(dir)?));
        if tok.fingerprint() != manifest.tokenizer_fingerprint {
            return Err(Error::Input(format!(
                "{}: the tokenizer files differ from the one the model was exported with",
                dir.display()
            )));
        }
        let templates = Templates::new(tok, manifest.prompt_style)?;
        let enc = Tokenizer::new(tok, templates, manifest.max_tokens)?;
        if let Some(p) = &manifest.prefix_tokens
            && enc.judge_prefix_ids() != Some(p.as_slice())
        {
            return Err(Error::Input(format!(
                "{}: the graph holds a judge prefix that this tokenizer and template do not produce; re-export the model",
                dir.display()
            )));
        }
        if enc.labels != manifest.label_ids {
            return Err(Error::Input(format!(
                "{}: label ids of the tokenizer differ from the manifest's",
                dir.display()
            )));
        }
        let pool = SessionPool::open(&dir.join(&manifest.model_file), threads)?;
        Ok(Self {
            manifest,
            dir: dir.to_path_buf(),
            enc,
            pool,
            limits,
            counters: Counters::default(),
        })
    }

    /// Work done since the judge was opened.
    pub fn stats(&self) -> RunStats {
        let c = &self.counters;
        RunStats {
            batches: c.batches.load(Ordering::Relaxed),
            sequences: c.sequences.load(Ordering::Relaxed),
            tokens: c.tokens.load(Ordering::Relaxed),
            padded_tokens: c.padded_tokens.load(Ordering::Relaxed),
            attention_cells: c.attention_cells.load(Ordering::Relaxed),
            key_columns: c.key_columns.load(Ordering::Relaxed),
        }
    }

    /// Sessions in the pool.
    pub fn sessions(&self) -> usize {
        self.pool.size()
    }

    /// The graph's input ids for the judge prompt of (x, a, b), cut to fit: the whole prompt,
    /// or what follows the judge prefix when the graph holds it.
    pub fn encode(&self, x: &str, a: &str, b: &str) -> Result<(Vec<u32>, bool)> {
        let t = self.enc.stage2(x, a, b)?;
        match &self.manifest.prefix_tokens {
            None => Ok((t.ids, t.truncated)),
            Some(p) => match t.ids.strip_prefix(p.as_slice()) {
                Some(rest) if !rest.is_empty() => Ok((rest.to_vec(), t.truncated)),
                _ => Err(Error::Input(
                    "this judge prompt's tokens do not start with the graph's judge prefix (re-export with --no-prefix-cache)".into(),
                )),
            },
        }
    }

    /// Runs `run` on every batch, in parallel, one session per worker; `run` returns (item,
    /// logits) for its batch's rows.
    fn run_batches<T: Send, const P: usize>(
        &self,
        batches: &[Planned<P>],
        run: impl Fn(&Planned<P>, &mut ort::session::Session) -> Result<Scored<T>> + Sync,
    ) -> Result<Scored<T>> {
        let next = AtomicUsize::new(0);
        let workers = self.pool.size().min(batches.len()).max(1);
        let results: Vec<Result<Scored<T>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| -> Result<Scored<T>> {
                        let mut got = Vec::new();
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            let Some(batch) = batches.get(k) else { break };
                            got.extend(self.pool.with(|sess| run(batch, sess))?);
                        }
                        Ok(got)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Runtime("a scoring thread panicked".into())))
                })
                .collect()
        });
        let mut all = Vec::new();
        for r in results {
            all.extend(r?);
        }
        Ok(all)
    }

    /// The judge_logits of a batch of `rows` rows, checked for shape, as (l_A, l_B) per row.
    fn check_logits(&self, shape: &[usize], data: &[f32], rows: usize) -> Result<Vec<[f32; 2]>> {
        if shape != [rows, 2] {
            return Err(Error::Runtime(format!(
                "judge_logits has shape {shape:?}, expected [{rows}, 2]"
            )));
        }
        Ok(data.chunks_exact(2).map(|c| [c[0], c[1]]).collect())
    }

    /// Counts a batch's work (rows x width per part; `keys` = the keys before a part's own).
    fn count(&self, parts: &[(&Batch, u64)], real: u64, sequences: u64, last_keys: u64) {
        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.sequences.fetch_add(sequences, Ordering::Relaxed);
        c.tokens.fetch_add(real, Ordering::Relaxed);
        for &(b, keys) in parts {
            let (n, w) = (b.rows as u64, b.width as u64);
            c.padded_tokens.fetch_add(n * w, Ordering::Relaxed);
            c.attention_cells
                .fetch_add(n * w * (keys + w), Ordering::Relaxed);
        }
        c.key_columns.fetch_add(last_keys, Ordering::Relaxed);
    }

    fn prefix_len(&self) -> u64 {
        self.manifest
            .prefix_tokens
            .as_ref()
            .map_or(0, |p| p.len() as u64)
    }

    /// Label logits (l_A, l_B) of each sequence, in input order, through a one-sequence-per-row
    /// graph. Sequences are sorted by length into batches; batches run in parallel, one per
    /// session.
    pub fn logits(&self, seqs: &[Vec<u32>]) -> Result<Vec<[f32; 2]>> {
        let batches = batches(self.limits, seqs.len(), 1, |i| [seqs[i].len()]);
        let plen = self.prefix_len();
        let got = self.run_batches(&batches, |planned, sess| {
            let batch = &planned.items;
            let rows: Vec<&[u32]> = batch.iter().map(|&i| seqs[i].as_slice()).collect();
            let b = Batch::left_padded_to(&rows, self.manifest.pad_id, planned.widths[0]);
            let real = rows.iter().map(|r| r.len() as u64).sum();
            let (n, w) = (b.rows as u64, b.width as u64);
            self.count(&[(&b, plen)], real, n, n * (plen + w));
            let (shape, data) = b.run(sess, &self.manifest.output)?;
            let l = self.check_logits(&shape, &data, batch.len())?;
            Ok(batch.iter().copied().zip(l).collect())
        })?;
        let mut out = vec![[0f32; 2]; seqs.len()];
        for (i, l) in got {
            out[i] = l;
        }
        Ok(out)
    }

    /// Label logits of both orders of each pair `(ab, ba)`, in input order, through a pair
    /// graph: the tokens both orders start with run once per pair.
    pub fn pair_logits(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<[[f32; 2]; 2]>> {
        let split: Vec<[usize; 2]> = pairs
            .iter()
            .map(|(ab, ba)| {
                let n = shared_len(ab, ba);
                [n, (ab.len() - n).max(ba.len() - n)]
            })
            .collect();
        let batches = batches(self.limits, pairs.len(), 2, |i| split[i]);
        let plen = self.prefix_len();
        let got = self.run_batches(&batches, |planned, sess| {
            let batch = &planned.items;
            let rows: Vec<(&[u32], &[u32])> = batch
                .iter()
                .map(|&i| (pairs[i].0.as_slice(), pairs[i].1.as_slice()))
                .collect();
            let b = PairBatch::padded_to(&rows, self.manifest.pad_id, planned.widths);
            let real = batch
                .iter()
                .map(|&i| (pairs[i].0.len() + pairs[i].1.len() - split[i][0]) as u64)
                .sum();
            let ws = b.shared.width as u64;
            let (n, w) = (b.rest.rows as u64, b.rest.width as u64);
            self.count(
                &[(&b.shared, plen), (&b.rest, plen + ws)],
                real,
                n,
                n * (plen + ws + w),
            );
            let (shape, data) = b.run(sess, &self.manifest.output)?;
            let l = self.check_logits(&shape, &data, 2 * batch.len())?;
            // Item 2i + k: pair i's order k.
            Ok(batch
                .iter()
                .flat_map(|&i| [2 * i, 2 * i + 1])
                .zip(l)
                .collect())
        })?;
        let mut out = vec![[[0f32; 2]; 2]; pairs.len()];
        for (j, l) in got {
            out[j / 2][j % 2] = l;
        }
        Ok(out)
    }

    /// A reward export's rewards of each pair's two responses, `(r_a, r_b, truncated)`, in
    /// input order. A pair that cannot be encoded gets its reason.
    pub fn pair_rewards(
        &self,
        pairs: &[(&str, &str, &str)],
    ) -> Result<Vec<std::result::Result<RewardPair, String>>> {
        if self.manifest.head != HeadKind::Reward {
            return Err(Error::Input(format!(
                "{}: not a reward model export (--head reward)",
                self.dir.display()
            )));
        }
        let encoded: Vec<std::result::Result<[gram_core::fit::Tokens; 2], String>> = pairs
            .iter()
            .map(|&(x, a, b)| {
                let e = |r| self.enc.reward(x, r).map_err(|e| e.to_string());
                Ok([e(a)?, e(b)?])
            })
            .collect();
        let seqs: Vec<&[u32]> = encoded
            .iter()
            .flatten()
            .flat_map(|[a, b]| [a.ids.as_slice(), b.ids.as_slice()])
            .collect();
        let batches = batches(self.limits, seqs.len(), 1, |i| [seqs[i].len()]);
        let got = self.run_batches(&batches, |planned, sess| {
            let batch = &planned.items;
            let rows: Vec<&[u32]> = batch.iter().map(|&i| seqs[i]).collect();
            let b = Batch::left_padded_to(&rows, self.manifest.pad_id, planned.widths[0]);
            let real = rows.iter().map(|r| r.len() as u64).sum();
            let (n, w) = (b.rows as u64, b.width as u64);
            self.count(&[(&b, 0)], real, n, n * w);
            let (shape, data) = b.run(sess, &self.manifest.output)?;
            if shape != [batch.len(), 1] {
                return Err(Error::Runtime(format!(
                    "rewards has shape {shape:?}, expected [{}, 1]",
                    batch.len()
                )));
            }
            Ok(batch.iter().copied().zip(data).collect())
        })?;
        let mut rewards = vec![0f32; seqs.len()];
        for (i, r) in got {
            rewards[i] = r;
        }
        let mut k = 0;
        Ok(encoded
            .into_iter()
            .map(|e| {
                e.map(|[a, b]| {
                    k += 2;
                    (rewards[k - 2], rewards[k - 1], a.truncated || b.truncated)
                })
            })
            .collect())
    }

    /// Both-order scores of pairs (prompt, a, b). A pair that cannot be encoded gets its reason.
    pub fn score_pairs(
        &self,
        pairs: &[(&str, &str, &str)],
    ) -> Result<Vec<std::result::Result<PairScore, String>>> {
        if self.manifest.head != HeadKind::Judge {
            return Err(Error::Input(format!(
                "{}: a reward model export ranks pairs only in `gram-score eval`; the other commands need --head judge",
                self.dir.display()
            )));
        }
        let mut encoded = self.encode_all(pairs);
        let logits: Vec<[f32; 2]> = if self.manifest.reads_pairs() {
            let both: Vec<(Vec<u32>, Vec<u32>)> = encoded
                .iter_mut()
                .flatten()
                .map(|e| (std::mem::take(&mut e.ab), std::mem::take(&mut e.ba)))
                .collect();
            self.pair_logits(&both)?.into_iter().flatten().collect()
        } else {
            let mut seqs = Vec::new();
            for e in encoded.iter_mut().flatten() {
                seqs.push(std::mem::take(&mut e.ab));
                seqs.push(std::mem::take(&mut e.ba));
            }
            self.logits(&seqs)?
        };
        let mut k = 0;
        Ok(encoded
            .into_iter()
            .map(|e| {
                e.map(|e| {
                    let (ab, ba) = (logits[k], logits[k + 1]);
                    k += 2;
                    PairScore {
                        score_a: pair_score((ab[0], ab[1]), (ba[0], ba[1])),
                        p_ab: prob_a(ab[0], ab[1]),
                        p_ba: prob_a(ba[0], ba[1]),
                        truncated: e.truncated,
                    }
                })
            })
            .collect())
    }

    /// Encodes pairs in both orders, in parallel across cores.
    fn encode_all(
        &self,
        pairs: &[(&str, &str, &str)],
    ) -> Vec<std::result::Result<Encoded, String>> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(pairs.len().max(1));
        let chunk = pairs.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = pairs
                .chunks(chunk)
                .map(|part| {
                    let h = s.spawn(move || {
                        part.iter()
                            .map(|&(x, a, b)| {
                                let (ab, t1) = self.encode(x, a, b).map_err(|e| e.to_string())?;
                                let (ba, t2) = self.encode(x, b, a).map_err(|e| e.to_string())?;
                                Ok(Encoded {
                                    ab,
                                    ba,
                                    truncated: t1 || t2,
                                })
                            })
                            .collect::<Vec<_>>()
                    });
                    (part.len(), h)
                })
                .collect();
            // A panicking tokenizer thread fails its rows, never drops them.
            handles
                .into_iter()
                .flat_map(|(n, h)| {
                    h.join().unwrap_or_else(|_| {
                        (0..n)
                            .map(|_| Err("tokenizer thread panicked".to_string()))
                            .collect()
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_items_of_one_padded_width_under_the_limits() {
        let limits = BatchLimits {
            max_rows: 6,
            max_tokens: 400,
        };
        // Pair-graph items: two rows each, (shared, rest) widths.
        let widths: Vec<[usize; 2]> = (0..40)
            .map(|i| [1 + (i * 7) % 50, 1 + (i * 13) % 90])
            .collect();
        let planned = batches(limits, widths.len(), 2, |i| widths[i]);
        let mut seen = vec![0; widths.len()];
        for b in &planned {
            assert!(!b.items.is_empty());
            assert!(b.widths.iter().all(|w| w % WIDTH_GRAIN == 0));
            let rows = 2 * b.items.len();
            let tokens = rows * b.widths.iter().sum::<usize>();
            assert!(b.items.len() == 1 || (rows <= limits.max_rows && tokens <= limits.max_tokens));
            for &i in &b.items {
                seen[i] += 1;
                // Each item's padded widths are its own, whatever else is in the batch.
                let own = widths[i].map(|w| w.next_multiple_of(WIDTH_GRAIN));
                assert_eq!(b.widths, own, "item {i}");
            }
        }
        assert!(seen.iter().all(|&k| k == 1), "every item exactly once");
        // Items of equal padded widths share batches where the limits allow.
        let one = batches(limits, 3, 2, |_| [10, 20]);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].items, vec![0, 1, 2]);
        // A single item over the token limit still runs, alone.
        let big = batches(limits, 2, 2, |_| [300, 300]);
        assert_eq!(
            big.iter().map(|b| b.items.len()).collect::<Vec<_>>(),
            vec![1, 1]
        );
    }
}
