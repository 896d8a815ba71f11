//! The build's report: counts per source, stage rows per split and token lengths; printed on
//! stderr and saved as `stats.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Counts of one source.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SourceStats {
    /// Input rows read (JSONL lines, array elements, CSV records, Parquet rows).
    pub rows_read: u64,
    /// Input rows rejected before mapping (unreadable, mistyped) or mapped to no pair.
    pub rows_rejected: u64,
    /// Pairs the mapping produced.
    pub pairs: u64,
    /// Pairs that reached the datasets.
    pub pairs_written: u64,
    /// Pairs rejected (by reason).
    pub pairs_rejected: u64,
    /// Rejects by reason (reasons with row-specific detail are grouped by their first words).
    pub reject_reasons: BTreeMap<String, u64>,
    /// Pairs by split.
    pub splits: BTreeMap<String, u64>,
    /// Pairs by label.
    pub labels: BTreeMap<String, u64>,
}

/// Token-length distribution of a dataset.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LengthStats {
    /// Examples.
    pub count: u64,
    /// Truncated examples.
    pub truncated: u64,
    /// Tokens in all examples.
    pub total: u64,
    /// Percentiles of the token count: p50, p90, p99, max.
    pub p50: u32,
    /// 90th percentile.
    pub p90: u32,
    /// 99th percentile.
    pub p99: u32,
    /// Longest.
    pub max: u32,
    /// Examples by length, until [`LengthStats::finish`] (how a plan's partitions hand their
    /// counts to the build; not in `stats.json`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    hist: BTreeMap<u32, u64>,
}

impl LengthStats {
    pub(crate) fn add(&mut self, n: usize, truncated: bool) {
        self.count += 1;
        self.truncated += u64::from(truncated);
        self.total += n as u64;
        *self.hist.entry(n as u32).or_default() += 1;
    }
    /// Adds `other`'s examples (before either is finished).
    pub(crate) fn absorb(&mut self, other: &LengthStats) {
        self.count += other.count;
        self.truncated += other.truncated;
        self.total += other.total;
        add_counts(&mut self.hist, &other.hist);
    }

    /// Computes the percentiles (and drops the histogram).
    pub(crate) fn finish(&mut self) {
        let q = |p: f64, h: &BTreeMap<u32, u64>, count: u64| {
            let want = ((count as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (&k, &v) in h {
                seen += v;
                if seen >= want {
                    return k;
                }
            }
            0
        };
        self.p50 = q(0.5, &self.hist, self.count);
        self.p90 = q(0.9, &self.hist, self.count);
        self.p99 = q(0.99, &self.hist, self.count);
        self.max = self.hist.keys().next_back().copied().unwrap_or(0);
        self.hist.clear();
    }
}

/// The stats report, printed and saved as `stats.json`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Per source (pipeline name).
    pub sources: BTreeMap<String, SourceStats>,
    /// Stage-1 rows by split.
    pub stage1: BTreeMap<String, u64>,
    /// Stage-2 rows by split.
    pub stage2: BTreeMap<String, u64>,
    /// Stage-1 token lengths.
    pub stage1_tokens: LengthStats,
    /// Stage-2 token lengths.
    pub stage2_tokens: LengthStats,
    /// Input rows in total.
    pub rows_read: u64,
    /// Rejected rows and pairs in total (= rows of rejects.parquet).
    pub rejected: u64,
    /// Pairs written.
    pub pairs_written: u64,
    /// rows_read = rows that produced pairs + rows rejected, and pairs = written + rejected.
    pub lossless: bool,
    /// Seconds the build took.
    pub seconds: f64,
    /// With `--cluster`: seconds of the tokenising plan (from submitting it to its last row
    /// written), part of `seconds`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_seconds: Option<f64>,
}

fn add_counts<K: Ord + Clone>(to: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
    for (k, v) in from {
        *to.entry(k.clone()).or_default() += v;
    }
}

impl SourceStats {
    fn absorb(&mut self, o: &SourceStats) {
        self.rows_read += o.rows_read;
        self.rows_rejected += o.rows_rejected;
        self.pairs += o.pairs;
        self.pairs_written += o.pairs_written;
        self.pairs_rejected += o.pairs_rejected;
        add_counts(&mut self.reject_reasons, &o.reject_reasons);
        add_counts(&mut self.splits, &o.splits);
        add_counts(&mut self.labels, &o.labels);
    }
}

impl Stats {
    /// Adds the counts of `o` (what one partition of a plan wrote) to these.
    pub(crate) fn absorb(&mut self, o: &Stats) {
        for (name, s) in &o.sources {
            self.sources.entry(name.clone()).or_default().absorb(s);
        }
        add_counts(&mut self.stage1, &o.stage1);
        add_counts(&mut self.stage2, &o.stage2);
        self.stage1_tokens.absorb(&o.stage1_tokens);
        self.stage2_tokens.absorb(&o.stage2_tokens);
        self.rows_read += o.rows_read;
        self.rejected += o.rejected;
        self.pairs_written += o.pairs_written;
    }
}

/// The key a reject reason is counted under in the stats.
pub(crate) fn reason_key(r: &str) -> String {
    // Group reasons of one kind; row-specific detail (ids, parser positions) is dropped.
    let r = match r.strip_prefix("pair ") {
        Some(rest) => rest.split_once(": ").map_or(rest, |(_, why)| why),
        None => r,
    };
    if r.starts_with("malformed JSON") {
        return "malformed JSON".into();
    }
    if r.starts_with("duplicate of pair") {
        return "duplicate of an earlier pair".into();
    }
    r.chars().take(80).collect()
}

/// Prints the stats as a table on stderr.
pub fn print_stats(s: &Stats, out: &Path) {
    eprintln!(
        "\n{:<28} {:>9} {:>9} {:>9} {:>9}  splits (train/valid/test)",
        "source", "rows", "pairs", "written", "rejected"
    );
    for (name, x) in &s.sources {
        let sp = |k: &str| x.splits.get(k).copied().unwrap_or(0);
        eprintln!(
            "{:<28} {:>9} {:>9} {:>9} {:>9}  {}/{}/{}",
            name,
            x.rows_read,
            x.pairs,
            x.pairs_written,
            x.rows_rejected + x.pairs_rejected,
            sp("train"),
            sp("valid"),
            sp("test")
        );
        for (r, n) in &x.reject_reasons {
            eprintln!("    rejected {n:>7}  {r}");
        }
    }
    let sp = |m: &BTreeMap<String, u64>| {
        format!(
            "{}/{}/{}",
            m.get("train").unwrap_or(&0),
            m.get("valid").unwrap_or(&0),
            m.get("test").unwrap_or(&0)
        )
    };
    eprintln!("stage 1 rows (train/valid/test): {}", sp(&s.stage1));
    eprintln!("stage 2 rows (train/valid/test): {}", sp(&s.stage2));
    for (n, l) in [("stage 1", &s.stage1_tokens), ("stage 2", &s.stage2_tokens)] {
        if l.count > 0 {
            eprintln!(
                "{n} tokens: p50 {} p90 {} p99 {} max {} ({} truncated)",
                l.p50, l.p90, l.p99, l.max, l.truncated
            );
        }
    }
    let rows_rejected: u64 = s.sources.values().map(|x| x.rows_rejected).sum();
    let pairs: u64 = s.sources.values().map(|x| x.pairs).sum();
    eprintln!(
        "rows in {} = {} mapped to pairs + {} rejected; pairs {} = {} written + {} rejected (lossless: {}); {:.1} s -> {}",
        s.rows_read,
        s.rows_read - rows_rejected,
        rows_rejected,
        pairs,
        s.pairs_written,
        s.rejected - rows_rejected,
        s.lossless,
        s.seconds,
        out.display()
    );
    if let Some(p) = s.plan_seconds {
        eprintln!("of which the tokenising plan (--cluster): {p:.1} s");
    }
}
