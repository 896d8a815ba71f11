//! `gram-score eval`: pairwise accuracy of a judge on labeled pairs (a `gram-data build`
//! folder's stage-2 split, or any Parquet with prompt / response_a / response_b / label), overall,
//! per source and per subset, printed as a table and saved as JSON.
//!
//! Each pair counts once (the stage-2 files hold it in both orders): the both-order score of
//! response_a decides; it is correct when it is above 0.5 for label `a` and below for `b`. A
//! score of exactly 0.5 is a tie and counts as wrong. A reward model export (`--head reward`)
//! ranks a pair by the rewards of its two responses instead (equal rewards: a tie). Every
//! accuracy carries a 95% bootstrap interval over its pairs.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, BooleanArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use gram_core::export::HeadKind;

use crate::error::{Error, Result};
use crate::judge::Judge;

/// One labeled pair.
#[derive(Debug, Clone)]
pub struct LabeledPair {
    /// Pair id (rows with the same id are one pair).
    pub pair_id: String,
    /// Source dataset.
    pub source: String,
    /// Subset, when the input has one.
    pub subset: Option<String>,
    /// Prompt.
    pub prompt: String,
    /// First response.
    pub a: String,
    /// Second response.
    pub b: String,
    /// Whether `a` is the preferred one.
    pub a_preferred: bool,
}

/// Accuracy of one group.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Group {
    /// Pairs scored.
    pub pairs: usize,
    /// Ranked correctly.
    pub correct: usize,
    /// Scored exactly 0.5.
    pub ties: usize,
    /// Could not be scored (reason in `failures`).
    pub failed: usize,
    /// correct / pairs.
    pub accuracy: f64,
    /// 95% bootstrap interval of the accuracy (2,000 resamples of the pairs, percentiles).
    pub ci95: Option<(f64, f64)>,
    /// Judges: single-order judgments (each order of each pair on its own) that were right.
    pub orders_correct: usize,
    /// Judges: `orders_correct` over the judgments (two per pair); below `accuracy` when the
    /// judge leans on the position, which the both-order score averages out.
    pub single_order_accuracy: Option<f64>,
    /// Each scored pair's outcome, in order (for the interval).
    #[serde(skip)]
    outcomes: Vec<bool>,
}

impl Group {
    fn add(&mut self, outcome: Option<Outcome>) {
        match outcome {
            Some(Outcome {
                correct,
                tie,
                orders,
            }) => {
                if let Some(o) = orders {
                    self.orders_correct += o.iter().filter(|&&x| x).count();
                    self.single_order_accuracy =
                        Some(self.orders_correct as f64 / (2 * (self.pairs + 1)) as f64);
                }
                self.pairs += 1;
                self.correct += usize::from(correct);
                self.ties += usize::from(tie);
                self.accuracy = self.correct as f64 / self.pairs as f64;
                self.outcomes.push(correct);
            }
            None => self.failed += 1,
        }
    }

    /// Computes the interval once every pair is in.
    fn finish(&mut self) {
        self.ci95 = bootstrap_ci(&self.outcomes, 2000);
    }
}

/// How one pair was judged.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// Ranked correctly (a tie is not).
    correct: bool,
    /// Scored exactly even.
    tie: bool,
    /// Judges: whether each order on its own (response_a first, then second) picked the
    /// preferred response.
    orders: Option<[bool; 2]>,
}

/// Percentile bootstrap: the 2.5th and 97.5th percentiles of the accuracy over `resamples`
/// resamples (with replacement, seeded) of `outcomes`.
pub fn bootstrap_ci(outcomes: &[bool], resamples: usize) -> Option<(f64, f64)> {
    let n = outcomes.len();
    if n == 0 || resamples == 0 {
        return None;
    }
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut accs: Vec<f64> = (0..resamples)
        .map(|_| {
            let hits = (0..n)
                .filter(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    outcomes[(s % n as u64) as usize]
                })
                .count();
            hits as f64 / n as f64
        })
        .collect();
    accs.sort_by(f64::total_cmp);
    let at = |p: f64| accs[(p * (resamples - 1) as f64).round() as usize];
    Some((at(0.025), at(0.975)))
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The export folder.
    pub model: PathBuf,
    /// The files read.
    pub files: Vec<PathBuf>,
    /// All pairs.
    pub overall: Group,
    /// Per source.
    pub by_source: BTreeMap<String, Group>,
    /// Per source/subset, where the input names subsets.
    pub by_subset: BTreeMap<String, Group>,
    /// Up to 20 reasons of failed pairs.
    pub failures: Vec<String>,
    /// Seconds spent scoring.
    pub seconds: f64,
}

/// The Parquet files of `data`: a file, or a `gram-data build` folder's `stage2/{split}-*.parquet`.
pub fn input_files(data: &Path, split: &str) -> Result<Vec<PathBuf>> {
    if data.is_file() {
        return Ok(vec![data.to_path_buf()]);
    }
    let dir = data.join("stage2");
    let files = gram_core::schema::split_files(&dir, split).map_err(|e| {
        Error::file(
            &dir,
            format!("{e} (expected a `gram-data build` output folder or a Parquet file)"),
        )
    })?;
    if files.is_empty() {
        return Err(Error::file(
            &dir,
            format!("no {split}-*.parquet files (splits are train, valid, test)"),
        ));
    }
    Ok(files)
}

fn col(
    batch: &arrow::record_batch::RecordBatch,
    name: &str,
    file: &Path,
) -> Result<Option<StringArray>> {
    let Some(c) = batch.column_by_name(name) else {
        return Ok(None);
    };
    let c =
        cast(c, &DataType::Utf8).map_err(|e| Error::file(file, format!("column `{name}`: {e}")))?;
    Ok(c.as_any().downcast_ref::<StringArray>().cloned())
}

/// Reads labeled pairs, one per pair id (the first row seen), keeping file order.
pub fn read_pairs(files: &[PathBuf]) -> Result<Vec<LabeledPair>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for f in files {
        let file = File::open(f).map_err(|e| Error::file(f, e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| Error::file(f, format!("not a readable Parquet file: {e}")))?;
        let mut row0 = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| Error::file(f, e))?;
            let need = |n: &str| -> Result<StringArray> {
                col(&batch, n, f)?.ok_or_else(|| {
                    Error::file(
                        f,
                        format!(
                            "no column `{n}` (eval needs prompt, response_a, response_b, label)"
                        ),
                    )
                })
            };
            let (prompt, a, b, label) = (
                need("prompt")?,
                need("response_a")?,
                need("response_b")?,
                need("label")?,
            );
            let pair_id = col(&batch, "pair_id", f)?.or(col(&batch, "id", f)?);
            let source = col(&batch, "source", f)?;
            let subset = col(&batch, "subset", f)?;
            let metadata = col(&batch, "metadata", f)?;
            let _swapped = batch
                .column_by_name("swapped")
                .and_then(|c| c.as_any().downcast_ref::<BooleanArray>().cloned());
            for i in 0..batch.num_rows() {
                let row = row0 + i;
                let get = |c: &StringArray, n: &str| -> Result<String> {
                    if c.is_null(i) {
                        Err(Error::file(f, format!("row {row}: `{n}` is null")))
                    } else {
                        Ok(c.value(i).to_string())
                    }
                };
                let id = match &pair_id {
                    Some(c) if !c.is_null(i) => c.value(i).to_string(),
                    _ => format!("{}#{row}", f.display()),
                };
                if !seen.insert(id.clone()) {
                    continue;
                }
                let l = get(&label, "label")?;
                let a_preferred = match l.to_ascii_lowercase().as_str() {
                    "a" => true,
                    "b" => false,
                    other => {
                        return Err(Error::file(
                            f,
                            format!("row {row}: label `{other}` is not a or b"),
                        ));
                    }
                };
                let subset = subset
                    .as_ref()
                    .filter(|c| !c.is_null(i))
                    .map(|c| c.value(i).to_string())
                    .or_else(|| {
                        metadata.as_ref().filter(|c| !c.is_null(i)).and_then(|c| {
                            serde_json::from_str::<serde_json::Value>(c.value(i))
                                .ok()
                                .and_then(|v| {
                                    v.get("subset").and_then(|s| s.as_str()).map(str::to_string)
                                })
                        })
                    });
                out.push(LabeledPair {
                    pair_id: id,
                    source: source
                        .as_ref()
                        .filter(|c| !c.is_null(i))
                        .map_or_else(|| "-".to_string(), |c| c.value(i).to_string()),
                    subset,
                    prompt: get(&prompt, "prompt")?,
                    a: get(&a, "response_a")?,
                    b: get(&b, "response_b")?,
                    a_preferred,
                });
            }
            row0 += batch.num_rows();
        }
    }
    Ok(out)
}

/// `limit` items spread evenly over `items` (a build folder writes its sources in blocks, so the
/// first N would be one source); all of them when `limit` is None or not smaller.
fn spread<T>(items: Vec<T>, limit: Option<usize>) -> Vec<T> {
    let n = items.len();
    match limit {
        Some(l) if l < n => items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| (i * l) % n < l)
            .map(|(_, x)| x)
            .collect(),
        _ => items,
    }
}

/// Scores the pairs and aggregates.
pub fn evaluate(
    judge: &Judge,
    files: Vec<PathBuf>,
    limit: Option<usize>,
    quiet: bool,
) -> Result<EvalReport> {
    let pairs = spread(read_pairs(&files)?, limit);
    let t0 = std::time::Instant::now();
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(pairs.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} pairs  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut report = EvalReport {
        model: judge.dir.clone(),
        files,
        overall: Group::default(),
        by_source: BTreeMap::new(),
        by_subset: BTreeMap::new(),
        failures: Vec::new(),
        seconds: 0.0,
    };
    for chunk in pairs.chunks(512) {
        for (p, o) in chunk.iter().zip(outcomes(judge, chunk)?) {
            let outcome = match o {
                Ok(o) => Some(o),
                Err(e) => {
                    if report.failures.len() < 20 {
                        report.failures.push(format!("pair {}: {e}", p.pair_id));
                    }
                    None
                }
            };
            report.overall.add(outcome);
            report
                .by_source
                .entry(p.source.clone())
                .or_default()
                .add(outcome);
            if let Some(sub) = &p.subset {
                report
                    .by_subset
                    .entry(format!("{}/{sub}", p.source))
                    .or_default()
                    .add(outcome);
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    report.overall.finish();
    report.by_source.values_mut().for_each(Group::finish);
    report.by_subset.values_mut().for_each(Group::finish);
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// How each pair was judged, or why it could not be scored: a judge's both-order score (and
/// each order's own verdict), or a reward model's two rewards.
fn outcomes(
    judge: &Judge,
    chunk: &[LabeledPair],
) -> Result<Vec<std::result::Result<Outcome, String>>> {
    let input: Vec<(&str, &str, &str)> = chunk
        .iter()
        .map(|p| (p.prompt.as_str(), p.a.as_str(), p.b.as_str()))
        .collect();
    let judged = |a_preferred: bool, a_wins: bool, tie: bool, orders| Outcome {
        correct: a_wins == a_preferred && !tie,
        tie,
        orders,
    };
    Ok(if judge.manifest.head == HeadKind::Reward {
        judge
            .pair_rewards(&input)?
            .into_iter()
            .zip(chunk)
            .map(|(r, p)| r.map(|(ra, rb, _)| judged(p.a_preferred, ra > rb, ra == rb, None)))
            .collect()
    } else {
        judge
            .score_pairs(&input)?
            .into_iter()
            .zip(chunk)
            .map(|(s, p)| {
                s.map(|s| {
                    // Order ab puts response_a in position A; order ba puts it in position B.
                    let orders = [
                        (s.p_ab > 0.5) == p.a_preferred,
                        (s.p_ba > 0.5) != p.a_preferred,
                    ];
                    judged(
                        p.a_preferred,
                        s.score_a > 0.5,
                        s.score_a == 0.5,
                        Some(orders),
                    )
                })
            })
            .collect()
    })
}

/// The report as a text table.
pub fn table(r: &EvalReport) -> String {
    let mut s = format!(
        "{:<40} {:>7} {:>9} {:>15} {:>6} {:>6}\n",
        "group", "pairs", "accuracy", "95% CI", "ties", "failed"
    );
    let mut line = |name: &str, g: &Group| {
        let ci = g.ci95.map_or_else(String::new, |(lo, hi)| {
            format!("{:.1}-{:.1}%", 100.0 * lo, 100.0 * hi)
        });
        s.push_str(&format!(
            "{:<40} {:>7} {:>8.1}% {:>15} {:>6} {:>6}\n",
            name,
            g.pairs,
            100.0 * g.accuracy,
            ci,
            g.ties,
            g.failed
        ));
    };
    for (k, g) in &r.by_source {
        line(k, g);
    }
    for (k, g) in &r.by_subset {
        line(&format!("  {k}"), g);
    }
    line("overall", &r.overall);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_spreads_over_blocks_of_sources() {
        // 3 sources in blocks of 100, 70, 30.
        let items: Vec<(usize, usize)> = (0..200)
            .map(|i| (usize::from(i >= 100) + usize::from(i >= 170), i))
            .collect();
        for l in [1, 7, 16, 99, 199] {
            let got = spread(items.clone(), Some(l));
            assert_eq!(got.len(), l, "limit {l}");
            assert!(got.windows(2).all(|w| w[0].1 < w[1].1), "order kept");
        }
        let got = spread(items.clone(), Some(16));
        let per = |s| got.iter().filter(|x| x.0 == s).count();
        assert_eq!((per(0), per(1), per(2)), (8, 6, 2), "{got:?}");
        assert_eq!(spread(items.clone(), None).len(), 200);
        assert_eq!(spread(items, Some(500)).len(), 200);
    }

    #[test]
    fn bootstrap_interval_brackets_the_accuracy_and_narrows_with_more_pairs() {
        let outcomes = |n: usize| (0..n).map(|i| i % 10 < 7).collect::<Vec<_>>();
        let (lo, hi) = bootstrap_ci(&outcomes(100), 2000).expect("an interval");
        assert!(lo < 0.7 && 0.7 < hi, "{lo}-{hi}");
        // Binomial: 1.96 * sqrt(0.21 / 100) = 0.090 on each side.
        assert!((hi - lo - 0.18).abs() < 0.04, "width {}", hi - lo);
        let (lo4, hi4) = bootstrap_ci(&outcomes(400), 2000).expect("an interval");
        assert!((hi4 - lo4) < 0.6 * (hi - lo), "{lo4}-{hi4} vs {lo}-{hi}");
        assert_eq!(bootstrap_ci(&[true; 5], 100), Some((1.0, 1.0)));
        assert_eq!(bootstrap_ci(&[], 100), None);
    }
}
