//! Batch scoring jobs: Parquet or JSON Lines in, Parquet (ZSTD) out, every input column kept and
//! the scores added.
//!
//! The input is read in chunks of `chunk_rows`; each finished chunk is written as its own part
//! file (`OUTPUT.parts/part-NNNNNN.parquet`, temp + rename) next to a `job.json` that pins the
//! input, the model and the options. A killed job re-run with the same arguments skips the parts
//! it has, so no row is scored twice or lost; when all parts exist they are joined into OUTPUT
//! (temp + rename) and the parts removed, or, sharded, the parts folder becomes OUTPUT with a
//! manifest naming its parts. Rows that cannot be scored (a null text, a template
//! that cannot fit) keep their place with null scores and the reason in `score_error`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float32Builder, Int32Array, ListArray,
    ListBuilder, StringArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::judge::{Judge, PairScore, Scorer};

/// How best-of-n picks its winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Keep the best so far and compare it with each next candidate (n - 1 comparisons).
    Knockout,
    /// Pairs in parallel, winners advance (log2 n rounds, n - 1 comparisons).
    Tournament,
}

/// What a job scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// (prompt, a, b) -> score of a, both orders averaged.
    Pairwise {
        /// Prompt column.
        prompt: String,
        /// First response column.
        a: String,
        /// Second response column.
        b: String,
    },
    /// (prompt, response, reference) -> reward = score(response against reference).
    Reference {
        /// Prompt column.
        prompt: String,
        /// Response column.
        response: String,
        /// Reference column, or None with `fixed` set.
        reference: Option<String>,
        /// One reference response for every row.
        fixed: Option<String>,
    },
    /// (prompt, [responses]) -> best index and scores.
    BestOfN {
        /// Prompt column.
        prompt: String,
        /// List-of-strings column.
        responses: String,
        /// Knockout or tournament.
        method: Method,
    },
}

impl Mode {
    fn text_columns(&self) -> Vec<&str> {
        match self {
            Mode::Pairwise { prompt, a, b } => vec![prompt, a, b],
            Mode::Reference {
                prompt,
                response,
                reference,
                ..
            } => {
                let mut v = vec![prompt.as_str(), response.as_str()];
                if let Some(r) = reference {
                    v.push(r);
                }
                v
            }
            Mode::BestOfN { prompt, .. } => vec![prompt],
        }
    }

    /// The columns a job adds.
    pub fn output_fields(&self) -> Vec<Field> {
        let f = |n: &str| Field::new(n, DataType::Float32, true);
        let mut v = match self {
            Mode::Pairwise { .. } => {
                vec![f("score_a"), f("score_b"), f("p_a_first"), f("p_a_second")]
            }
            Mode::Reference { .. } => {
                vec![f("reward"), f("p_response_first"), f("p_response_second")]
            }
            Mode::BestOfN { .. } => vec![
                Field::new("best_index", DataType::Int32, true),
                Field::new(
                    "scores",
                    DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
                    true,
                ),
                Field::new("comparisons", DataType::Int32, false),
            ],
        };
        v.push(Field::new("score_truncated", DataType::Boolean, false));
        v.push(Field::new("score_error", DataType::Utf8, true));
        v
    }
}

/// Options of a job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Input Parquet file.
    pub input: PathBuf,
    /// Output Parquet file.
    pub output: PathBuf,
    /// Score only the first rows.
    pub limit: Option<usize>,
    /// Rows per chunk (the unit of progress and of resuming).
    pub chunk_rows: usize,
    /// Throw away a partial job's parts instead of resuming it.
    pub restart: bool,
    /// No progress bar.
    pub quiet: bool,
    /// Score on this target (a Ballista cluster) instead of with the judge in this process.
    pub cluster: Option<gram_session::Target>,
    /// The output is a folder of the parts and a manifest, not one file.
    pub sharded: bool,
}

/// What a job did.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    /// Rows in = rows out.
    pub rows: usize,
    /// Rows scored now (not taken from an earlier, killed run).
    pub rows_scored: usize,
    /// Rows with an error instead of a score.
    pub rows_failed: usize,
    /// Chunks found done from an earlier run.
    pub chunks_resumed: usize,
    /// Seconds spent.
    pub seconds: f64,
    /// Model work of the rows scored now.
    pub work: crate::judge::RunStats,
}

/// What pins a partial job: resuming with anything else would mix outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct JobKey {
    input: PathBuf,
    input_bytes: u64,
    input_modified: u64,
    rows: usize,
    chunk_rows: usize,
    mode: Mode,
    model: PathBuf,
    model_source: PathBuf,
    max_tokens: usize,
}

fn parts_dir(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    output.with_file_name(format!("{name}.parts"))
}

fn string_column(batch: &RecordBatch, name: &str, file: &Path) -> Result<StringArray> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| Error::file(file, format!("no column `{name}`")))?;
    let c = cast(col, &DataType::Utf8)
        .map_err(|e| Error::file(file, format!("column `{name}`: {e}")))?;
    Ok(c.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .unwrap_or_else(|| StringArray::from(Vec::<Option<&str>>::new())))
}

fn check_schema(schema: &Schema, mode: &Mode, file: &Path) -> Result<()> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let is_text =
        |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    for c in mode.text_columns() {
        match schema.field_with_name(c) {
            Err(_) => {
                return Err(Error::file(
                    file,
                    format!(
                        "no column `{c}` (columns: {}); name another with the --*-col options",
                        names.join(", ")
                    ),
                ));
            }
            Ok(f) if !is_text(f.data_type()) => {
                return Err(Error::file(
                    file,
                    format!("column `{c}` is {}, expected strings", f.data_type()),
                ));
            }
            Ok(_) => {}
        }
    }
    if let Mode::BestOfN { responses, .. } = mode {
        let f = schema.field_with_name(responses).map_err(|_| {
            Error::file(
                file,
                format!(
                    "no column `{responses}` (columns: {}); name another with --responses-col",
                    names.join(", ")
                ),
            )
        })?;
        let ok = match f.data_type() {
            DataType::List(i) | DataType::LargeList(i) => is_text(i.data_type()),
            _ => false,
        };
        if !ok {
            return Err(Error::file(
                file,
                format!(
                    "column `{responses}` is {}, expected a list of strings",
                    f.data_type()
                ),
            ));
        }
    }
    for f in mode.output_fields() {
        if names.contains(&f.name().as_str()) {
            return Err(Error::file(
                file,
                format!(
                    "the input already has a column `{}`, which the output adds; rename it",
                    f.name()
                ),
            ));
        }
    }
    Ok(())
}

/// Runs a job; see the module docs. The chunks are scored by `judge`, or with `opts.cluster`
/// by a plan on that target whose tasks read, score and write them (module `cluster`).
pub fn run(judge: &Judge, mode: &Mode, opts: &JobOptions) -> Result<JobReport> {
    let t0 = std::time::Instant::now();
    let input = &opts.input;
    let meta = std::fs::metadata(input).map_err(|e| Error::file(input, e))?;
    let chunk_rows = opts.chunk_rows.max(1);
    let crate::input::Input {
        schema: in_schema,
        rows,
        batches: reader,
    } = crate::input::open(input, opts.limit, chunk_rows)?;
    check_schema(&in_schema, mode, input)?;
    let out_schema = output_schema(&in_schema, mode);

    let key = JobKey {
        input: std::fs::canonicalize(input).unwrap_or_else(|_| input.clone()),
        input_bytes: meta.len(),
        input_modified: meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs()),
        rows,
        chunk_rows,
        mode: mode.clone(),
        model: std::fs::canonicalize(&judge.dir).unwrap_or_else(|_| judge.dir.clone()),
        model_source: judge.manifest.source.clone(),
        max_tokens: judge.manifest.max_tokens,
    };
    let parts = parts_dir(&opts.output);
    let key_file = parts.join("job.json");
    if parts.exists() && opts.restart {
        std::fs::remove_dir_all(&parts).map_err(|e| Error::file(&parts, e))?;
    }
    if parts.exists() {
        let old: Option<JobKey> = std::fs::read(&key_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if old.as_ref() != Some(&key) {
            return Err(Error::file(
                &parts,
                "holds a partial job with another input, model or options; re-run with --restart to discard it",
            ));
        }
    } else {
        std::fs::create_dir_all(&parts).map_err(|e| Error::file(&parts, e))?;
        let json = serde_json::to_vec_pretty(&key).map_err(|e| Error::Runtime(e.to_string()))?;
        gram_core::atomic_write(&key_file, &json)?;
    }

    let n_chunks = rows.div_ceil(chunk_rows);
    let bar = progress(rows as u64, opts.quiet);
    let chunks = Chunks {
        parts: &parts,
        chunk_rows,
        bar: &bar,
    };
    let (scored, failed, resumed) = match &opts.cluster {
        Some(target) => {
            let input = Input {
                path: input,
                schema: in_schema,
                rows,
                batches: reader,
            };
            chunks.on_cluster(target, judge, mode, input)?
        }
        None => chunks.here(judge, mode, input, reader, &out_schema)?,
    };
    bar.finish_and_clear();
    match opts.sharded {
        true => publish_parts(&parts, &opts.output, n_chunks, rows)?,
        false => finish(&parts, &opts.output, out_schema, n_chunks, rows)?,
    }
    Ok(JobReport {
        rows,
        rows_scored: scored,
        rows_failed: failed,
        chunks_resumed: resumed,
        seconds: t0.elapsed().as_secs_f64(),
        work: judge.stats(),
    })
}

/// The columns of a job's output: the input's, then the scores.
pub(crate) fn output_schema(in_schema: &Schema, mode: &Mode) -> SchemaRef {
    let mut fields: Vec<Field> = in_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend(mode.output_fields());
    Arc::new(Schema::new_with_metadata(
        fields,
        in_schema.metadata().clone(),
    ))
}

/// The part file of chunk `k`.
pub(crate) fn part_path(parts: &Path, k: usize) -> PathBuf {
    parts.join(format!("part-{k:06}.parquet"))
}

/// A job's input as opened.
struct Input<'a> {
    path: &'a Path,
    schema: SchemaRef,
    rows: usize,
    batches: Box<dyn Iterator<Item = Result<RecordBatch>>>,
}

/// A job's chunks and their parts.
struct Chunks<'a> {
    parts: &'a Path,
    chunk_rows: usize,
    bar: &'a indicatif::ProgressBar,
}

impl Chunks<'_> {
    /// Scores the chunks without a part with `judge`: (rows scored, rows failed, chunks resumed).
    fn here(
        &self,
        judge: &Judge,
        mode: &Mode,
        input: &Path,
        reader: Box<dyn Iterator<Item = Result<RecordBatch>>>,
        out_schema: &SchemaRef,
    ) -> Result<(usize, usize, usize)> {
        let (mut scored, mut failed, mut resumed) = (0usize, 0usize, 0usize);
        for (k, batch) in reader.enumerate() {
            let batch = batch?;
            let part = part_path(self.parts, k);
            if part.exists() {
                resumed += 1;
                self.bar.inc(batch.num_rows() as u64);
                continue;
            }
            let first = k * self.chunk_rows;
            let (cols, n_failed) = score_chunk(judge, mode, &batch, input, first)?;
            let mut all: Vec<ArrayRef> = batch.columns().to_vec();
            all.extend(cols);
            let out = RecordBatch::try_new(out_schema.clone(), all)
                .map_err(|e| Error::Runtime(format!("building output rows: {e}")))?;
            write_parquet(&part, out_schema.clone(), std::iter::once(out))?;
            scored += batch.num_rows();
            failed += n_failed;
            self.bar.inc(batch.num_rows() as u64);
        }
        Ok((scored, failed, resumed))
    }

    /// Scores the chunks without a part on `target`, whose tasks read the input (JSON Lines
    /// first written as Parquet into the parts folder) and write the parts.
    fn on_cluster(
        &self,
        target: &gram_session::Target,
        judge: &Judge,
        mode: &Mode,
        input: Input<'_>,
    ) -> Result<(usize, usize, usize)> {
        crate::cluster::check_reachable(target)?;
        let n_chunks = input.rows.div_ceil(self.chunk_rows);
        let todo: Vec<usize> = (0..n_chunks)
            .filter(|&k| !part_path(self.parts, k).exists())
            .collect();
        let resumed = n_chunks - todo.len();
        let done_rows = input.rows
            - todo
                .iter()
                .map(|&k| self.rows_of(k, input.rows))
                .sum::<usize>();
        self.bar.inc(done_rows as u64);
        if todo.is_empty() {
            return Ok((0, 0, resumed));
        }
        let source = if crate::input::is_json_lines(input.path) {
            let p = self.parts.join("input.parquet");
            write_parquet(
                &p,
                input.schema.clone(),
                input.batches.collect::<Result<Vec<_>>>()?,
            )?;
            p
        } else {
            input.path.to_path_buf()
        };
        let abs = |p: &Path| -> Result<String> {
            let a = std::fs::canonicalize(p).map_err(|e| Error::file(p, e))?;
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| Error::file(&a, "not a UTF-8 path"))
        };
        let spec = crate::cluster::ChunkSpec {
            input: abs(&source)?,
            model: abs(&judge.dir)?,
            limits: (judge.limits.max_rows, judge.limits.max_tokens),
            mode: mode.clone(),
            chunk_rows: self.chunk_rows,
            rows: input.rows,
            parts: abs(self.parts)?,
            chunks: todo,
        };
        let done = crate::cluster::run(target, &spec)?;
        self.bar.inc(done.rows as u64);
        Ok((done.rows, done.failed, resumed))
    }

    /// Rows in chunk `k` of a job of `rows` rows.
    fn rows_of(&self, k: usize, rows: usize) -> usize {
        self.chunk_rows
            .min(rows.saturating_sub(k * self.chunk_rows))
    }
}

fn progress(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rows  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Writes batches to `path` through a temp file renamed into place.
pub(crate) fn write_parquet(
    path: &Path,
    schema: SchemaRef,
    batches: impl IntoIterator<Item = RecordBatch>,
) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> std::result::Result<(), String> {
        let f = File::create(&tmp).map_err(|e| e.to_string())?;
        let mut w = ArrowWriter::try_new(f, schema, Some(gram_core::parquet_props().build()))
            .map_err(|e| e.to_string())?;
        for b in batches {
            w.write(&b).map_err(|e| e.to_string())?;
        }
        let f = w.into_inner().map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, path).map_err(|e| e.to_string())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, e));
    }
    Ok(())
}

/// Joins the parts into the output and removes them.
fn finish(
    parts: &Path,
    output: &Path,
    schema: SchemaRef,
    n_chunks: usize,
    rows: usize,
) -> Result<()> {
    let mut count = 0usize;
    // Parts are small (chunk_rows rows each); they are read one at a time while writing.
    let readers = (0..n_chunks).map(|k| {
        let p = parts.join(format!("part-{k:06}.parquet"));
        let f = File::open(&p).map_err(|e| Error::file(&p, e))?;
        ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.build())
            .map_err(|e| Error::file(&p, e))
            .map(|r| (p, r))
    });
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = output.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> Result<()> {
        let f = File::create(&tmp).map_err(|e| Error::file(&tmp, e))?;
        let mut w =
            ArrowWriter::try_new(f, schema.clone(), Some(gram_core::parquet_props().build()))
                .map_err(|e| Error::file(&tmp, e))?;
        for r in readers {
            let (p, r) = r?;
            for b in r {
                let b = b.map_err(|e| Error::file(&p, e))?;
                count += b.num_rows();
                w.write(&b).map_err(|e| Error::file(&tmp, e))?;
            }
        }
        if count != rows {
            return Err(Error::Runtime(format!(
                "{} rows in the parts, {rows} in the input: not writing {}",
                count,
                output.display()
            )));
        }
        let f = w.into_inner().map_err(|e| Error::file(&tmp, e))?;
        f.sync_all().map_err(|e| Error::file(&tmp, e))?;
        std::fs::rename(&tmp, output).map_err(|e| Error::file(output, e))
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::remove_dir_all(parts).map_err(|e| Error::file(parts, e))
}

/// Makes the parts the output folder: checks their rows add up (from their footers), writes
/// the manifest naming them and moves the folder into place (an old OUTPUT goes first).
fn publish_parts(parts: &Path, output: &Path, n_chunks: usize, rows: usize) -> Result<()> {
    let mut files = Vec::with_capacity(n_chunks);
    let mut count = 0usize;
    for k in 0..n_chunks {
        let p = part_path(parts, k);
        let f = File::open(&p).map_err(|e| Error::file(&p, e))?;
        let r = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| Error::file(&p, e))?;
        count += usize::try_from(r.metadata().file_metadata().num_rows()).unwrap_or(0);
        files.push(format!("part-{k:06}.parquet"));
    }
    if count != rows {
        return Err(Error::Runtime(format!(
            "{count} rows in the parts, {rows} in the input: not writing {}",
            output.display()
        )));
    }
    for extra in ["job.json", "input.parquet"] {
        let p = parts.join(extra);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::file(&p, e))?;
        }
    }
    let manifest = serde_json::json!({
        "builder": format!("gram-score {}", env!("CARGO_PKG_VERSION")),
        "rows": rows,
        "files": files,
    });
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Runtime(e.to_string()))?;
    gram_core::atomic_write(&parts.join(crate::out::MANIFEST), &text)?;
    if output.is_dir() {
        std::fs::remove_dir_all(output).map_err(|e| Error::file(output, e))?;
    } else if output.exists() {
        std::fs::remove_file(output).map_err(|e| Error::file(output, e))?;
    }
    std::fs::rename(parts, output).map_err(|e| Error::file(output, e))
}

/// A row's texts or why it has none.
fn texts<'a>(
    cols: &'a [StringArray],
    i: usize,
    names: &[&str],
    first_row: usize,
) -> std::result::Result<Vec<&'a str>, String> {
    cols.iter()
        .zip(names)
        .map(|(c, n)| {
            if c.is_null(i) {
                Err(format!("row {}: `{n}` is null", first_row + i))
            } else {
                Ok(c.value(i))
            }
        })
        .collect()
}

/// Scores one chunk; returns the added columns and how many rows failed.
pub(crate) fn score_chunk(
    judge: &dyn Scorer,
    mode: &Mode,
    batch: &RecordBatch,
    file: &Path,
    first_row: usize,
) -> Result<(Vec<ArrayRef>, usize)> {
    let n = batch.num_rows();
    let names = mode.text_columns();
    let cols = names
        .iter()
        .map(|c| string_column(batch, c, file))
        .collect::<Result<Vec<_>>>()?;
    let mut c = Chunk {
        cols: &cols,
        names: &names,
        first_row,
        errors: vec![None; n],
        truncated: vec![false; n],
    };
    let mut out = match mode {
        Mode::Pairwise { .. } | Mode::Reference { .. } => c.score_pairs(judge, mode)?,
        Mode::BestOfN {
            responses, method, ..
        } => {
            let list = list_column(batch, responses, file)?;
            c.best_of_n(judge, &list, responses, *method)?
        }
    };
    let failed = c.errors.iter().filter(|e| e.is_some()).count();
    out.push(Arc::new(BooleanArray::from(c.truncated)));
    out.push(Arc::new(c.errors.into_iter().collect::<StringArray>()));
    Ok((out, failed))
}

/// A chunk's text columns and, row by row, what went wrong and what was cut.
struct Chunk<'a> {
    cols: &'a [StringArray],
    names: &'a [&'a str],
    first_row: usize,
    errors: Vec<Option<String>>,
    truncated: Vec<bool>,
}

/// The list-of-strings column `name`.
fn list_column(batch: &RecordBatch, name: &str, file: &Path) -> Result<ListArray> {
    let list = batch
        .column_by_name(name)
        .ok_or_else(|| Error::file(file, format!("no column `{name}`")))?;
    let list = cast(
        list,
        &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
    )
    .map_err(|e| Error::file(file, format!("column `{name}`: {e}")))?;
    list.as_any()
        .downcast_ref::<ListArray>()
        .cloned()
        .ok_or_else(|| Error::file(file, format!("column `{name}` is not a list")))
}

impl Chunk<'_> {
    fn row(&self, i: usize) -> usize {
        self.first_row + i
    }

    /// Pairwise (score_a, score_b, p_a_first, p_a_second) or reference (reward,
    /// p_response_first, p_response_second) columns.
    fn score_pairs(&mut self, judge: &dyn Scorer, mode: &Mode) -> Result<Vec<ArrayRef>> {
        let n = self.errors.len();
        let fixed = match mode {
            Mode::Reference { fixed, .. } => fixed.as_deref(),
            _ => None,
        };
        let mut pairs = Vec::new();
        let mut which = Vec::new();
        for i in 0..n {
            match texts(self.cols, i, self.names, self.first_row) {
                Ok(t) => {
                    let b = fixed.unwrap_or_else(|| t.get(2).copied().unwrap_or(""));
                    pairs.push((t[0], t[1], b));
                    which.push(i);
                }
                Err(e) => self.errors[i] = Some(e),
            }
        }
        let scores = judge.score_pairs(&pairs)?;
        let mut got: Vec<Option<PairScore>> = vec![None; n];
        for (&i, s) in which.iter().zip(scores) {
            match s {
                Ok(s) => {
                    self.truncated[i] = s.truncated;
                    got[i] = Some(s);
                }
                Err(e) => self.errors[i] = Some(format!("row {}: {e}", self.row(i))),
            }
        }
        let col = |f: &dyn Fn(&PairScore) -> f32| -> ArrayRef {
            Arc::new(
                got.iter()
                    .map(|s| s.as_ref().map(f))
                    .collect::<Float32Array>(),
            )
        };
        Ok(match mode {
            Mode::Pairwise { .. } => vec![
                col(&|s| s.score_a),
                col(&|s| 1.0 - s.score_a),
                col(&|s| s.p_ab),
                col(&PairScore::p_a_second),
            ],
            _ => vec![
                col(&|s| s.score_a),
                col(&|s| s.p_ab),
                col(&PairScore::p_a_second),
            ],
        })
    }

    /// Row `i`'s candidates, or why it has none.
    fn candidates(
        &self,
        list: &ListArray,
        responses: &str,
        i: usize,
    ) -> std::result::Result<Vec<String>, String> {
        let row = self.row(i);
        if list.is_null(i) {
            return Err(format!("row {row}: `{responses}` is null"));
        }
        let v = list.value(i);
        let s = v
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| format!("row {row}: responses are not strings"))?;
        let c = (0..s.len())
            .map(|j| {
                if s.is_null(j) {
                    Err(format!("row {row}: response {j} is null"))
                } else {
                    Ok(s.value(j).to_string())
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if c.is_empty() {
            return Err(format!("row {row}: no responses"));
        }
        Ok(c)
    }

    /// best_index, scores, comparisons columns.
    fn best_of_n(
        &mut self,
        judge: &dyn Scorer,
        list: &ListArray,
        responses: &str,
        method: Method,
    ) -> Result<Vec<ArrayRef>> {
        let n = self.errors.len();
        let mut rows: Vec<Option<(&str, Vec<String>)>> = Vec::with_capacity(n);
        for i in 0..n {
            let row = texts(self.cols, i, self.names, self.first_row)
                .and_then(|t| Ok((t[0], self.candidates(list, responses, i)?)));
            match row {
                Ok(r) => rows.push(Some(r)),
                Err(e) => {
                    self.errors[i] = Some(e);
                    rows.push(None);
                }
            }
        }
        let results = best_of_n(judge, &rows, method)?;
        let mut best = Vec::with_capacity(n);
        let mut comps = Vec::with_capacity(n);
        let mut scores = ListBuilder::new(Float32Builder::new());
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(r)) => {
                    best.push(Some(r.best as i32));
                    comps.push(r.comparisons as i32);
                    self.truncated[i] = r.truncated;
                    for s in r.scores {
                        scores.values().append_option(s);
                    }
                    scores.append(true);
                }
                other => {
                    if let Some(Err(e)) = other {
                        self.errors[i] = Some(format!("row {}: {e}", self.row(i)));
                    }
                    best.push(None);
                    comps.push(0);
                    scores.append(false);
                }
            }
        }
        Ok(vec![
            Arc::new(Int32Array::from(best)),
            Arc::new(scores.finish()),
            Arc::new(Int32Array::from(comps)),
        ])
    }
}

/// The result of one best-of-n row.
#[derive(Debug, Clone, PartialEq)]
pub struct BestOfN {
    /// Index of the winner.
    pub best: usize,
    /// Per candidate: its both-order score in the last comparison it took part in (None for a
    /// lone candidate).
    pub scores: Vec<Option<f32>>,
    /// Comparisons made.
    pub comparisons: usize,
    /// Whether any text was cut.
    pub truncated: bool,
}

/// Best-of-n over many rows at once: each step's comparisons of all rows go to the model
/// together (one `score_pairs` call), so batches stay full.
pub fn best_of_n(
    judge: &dyn Scorer,
    rows: &[Option<(&str, Vec<String>)>],
    method: Method,
) -> Result<Vec<Option<std::result::Result<BestOfN, String>>>> {
    struct State {
        alive: Vec<usize>,
        res: BestOfN,
        err: Option<String>,
    }
    let mut st: Vec<Option<State>> = rows
        .iter()
        .map(|r| {
            r.as_ref().map(|(_, c)| State {
                alive: (0..c.len()).collect(),
                res: BestOfN {
                    best: 0,
                    scores: vec![None; c.len()],
                    comparisons: 0,
                    truncated: false,
                },
                err: None,
            })
        })
        .collect();
    loop {
        // This step's matches: (row, candidate i, candidate j).
        let mut matches: Vec<(usize, usize, usize)> = Vec::new();
        for (r, s) in st.iter().enumerate() {
            let Some(s) = s else { continue };
            if s.err.is_some() || s.alive.len() < 2 {
                continue;
            }
            match method {
                Method::Knockout => matches.push((r, s.alive[0], s.alive[1])),
                Method::Tournament => {
                    for p in s.alive.chunks(2) {
                        if let [i, j] = p {
                            matches.push((r, *i, *j));
                        }
                    }
                }
            }
        }
        if matches.is_empty() {
            break;
        }
        let pairs: Vec<(&str, &str, &str)> = matches
            .iter()
            .filter_map(|&(r, i, j)| {
                rows[r]
                    .as_ref()
                    .map(|(p, c)| (*p, c[i].as_str(), c[j].as_str()))
            })
            .collect();
        let scores = judge.score_pairs(&pairs)?;
        let mut losers: Vec<(usize, usize)> = Vec::new();
        for (&(r, i, j), s) in matches.iter().zip(scores) {
            let Some(state) = st[r].as_mut() else {
                continue;
            };
            match s {
                Ok(s) => {
                    state.res.comparisons += 1;
                    state.res.truncated |= s.truncated;
                    state.res.scores[i] = Some(s.score_a);
                    state.res.scores[j] = Some(1.0 - s.score_a);
                    // A tie keeps the earlier candidate.
                    losers.push((r, if s.score_a >= 0.5 { j } else { i }));
                }
                Err(e) => state.err = Some(format!("comparing responses {i} and {j}: {e}")),
            }
        }
        for (r, l) in losers {
            if let Some(s) = st[r].as_mut() {
                s.alive.retain(|&x| x != l);
            }
        }
    }
    Ok(st
        .into_iter()
        .map(|s| {
            s.map(|mut s| match s.err {
                Some(e) => Err(e),
                None => {
                    s.res.best = s.alive[0];
                    Ok(s.res)
                }
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_of_n_rows_without_usable_candidates_say_why() {
        let mut b = ListBuilder::new(arrow::array::StringBuilder::new());
        b.append(false); // null list
        b.append(true); // empty list
        b.values().append_value("a");
        b.values().append_null();
        b.append(true); // a null candidate
        b.values().append_value("x");
        b.values().append_value("y");
        b.append(true);
        let list = b.finish();
        let c = Chunk {
            cols: &[],
            names: &[],
            first_row: 10,
            errors: vec![None; 4],
            truncated: vec![false; 4],
        };
        let got: Vec<_> = (0..4)
            .map(|i| c.candidates(&list, "responses", i))
            .collect();
        assert_eq!(got[0], Err("row 10: `responses` is null".to_string()));
        assert_eq!(got[1], Err("row 11: no responses".to_string()));
        assert_eq!(got[2], Err("row 12: response 1 is null".to_string()));
        assert_eq!(got[3], Ok(vec!["x".to_string(), "y".to_string()]));
    }
}
