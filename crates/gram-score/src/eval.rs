//! `gram-score eval`: pairwise accuracy of a judge on labeled pairs (a `gram-data build`
//! folder's stage-2 split, or any Parquet with prompt / response_a / response_b / label), overall,
//! per source and per subset, printed as a table and saved as JSON.
//!
//! Each pair counts once (the stage-2 files hold it in both orders): the both-order score of
//! response_a decides; it is correct when it is above 0.5 for label `a` and below for `b`. A
//! score of exactly 0.5 is a tie and counts as wrong.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, BooleanArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

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
}

impl Group {
    fn add(&mut self, outcome: Option<(bool, bool)>) {
        match outcome {
            Some((correct, tie)) => {
                self.pairs += 1;
                self.correct += usize::from(correct);
                self.ties += usize::from(tie);
                self.accuracy = self.correct as f64 / self.pairs as f64;
            }
            None => self.failed += 1,
        }
    }
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

/// Scores the pairs and aggregates.
pub fn evaluate(
    judge: &Judge,
    files: Vec<PathBuf>,
    limit: Option<usize>,
    quiet: bool,
) -> Result<EvalReport> {
    let mut pairs = read_pairs(&files)?;
    if let Some(l) = limit {
        pairs.truncate(l);
    }
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
        let input: Vec<(&str, &str, &str)> = chunk
            .iter()
            .map(|p| (p.prompt.as_str(), p.a.as_str(), p.b.as_str()))
            .collect();
        let scores = judge.score_pairs(&input)?;
        for (p, s) in chunk.iter().zip(scores) {
            let outcome = match s {
                Ok(s) => {
                    let tie = s.score_a == 0.5;
                    Some(((s.score_a > 0.5) == p.a_preferred && !tie, tie))
                }
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
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The report as a text table.
pub fn table(r: &EvalReport) -> String {
    let mut s = format!(
        "{:<40} {:>7} {:>9} {:>6} {:>6}\n",
        "group", "pairs", "accuracy", "ties", "failed"
    );
    let mut line = |name: &str, g: &Group| {
        s.push_str(&format!(
            "{:<40} {:>7} {:>8.1}% {:>6} {:>6}\n",
            name,
            g.pairs,
            100.0 * g.accuracy,
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
