//! The plan leaf that reads a build's sources where its tasks run ([`gram_session::work`]): one
//! item per input file (per `--split-mib` of an uncompressed JSON Lines file), each read, mapped by its pipeline's SQL and checked chunk by chunk exactly as a build
//! without `--cluster` does it ([`crate::pairs::check_chunk`]). Its rows are the checked pairs,
//! and, so that nothing is lost on the way to the writing tasks ([`crate::sink`]), the rejects
//! of reading, mapping and checking and one row of counts per chunk ([`Kind`]). Each row has a
//! `seq` that orders the whole input as the build reads it (file, then place in the file), and a
//! `dedup_key`: the pair's, or one of its own for the other kinds.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arrow::array::{
    ArrayRef, BooleanBuilder, RecordBatch, StringBuilder, UInt8Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DataFusionError, Result as DfResult};
use futures::stream::BoxStream;
use gram_session::work::Work;
use serde::{Deserialize, Serialize};

use crate::build::BuildOptions;
use crate::error::{Error, OrInternal, Result};
use crate::map::Mapper;
use crate::pairs::{Checked, Pair, check_chunk};
use crate::read::{LineRange, Reject, line_ranges, read_file_as, read_jsonl_range};
use crate::spec::Spec;
use crate::stage::swapped;

/// What a row of the scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// A checked pair.
    Pair = 0,
    /// An input row that became no pair (unreadable, or mapped to none).
    RowReject = 1,
    /// A mapped pair that failed its checks.
    PairReject = 2,
    /// A chunk's counts: input rows read (`n_rows`) and pairs mapped (`n_pairs`).
    Counts = 3,
}

impl Kind {
    pub(crate) fn of(k: u8) -> Option<Self> {
        [Self::Pair, Self::RowReject, Self::PairReject, Self::Counts]
            .into_iter()
            .find(|x| *x as u8 == k)
    }
}

/// Rows one file may put out before its `seq`s reach the next file's (2^40).
const SEQ_BITS: u32 = 40;

/// One input file of the scan.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ScanFile {
    /// Its pipeline (index into [`ScanSpec::pipelines`]).
    pipeline: usize,
    /// The file as the build names it (in ids, rejects and the `file` column).
    name: String,
    /// Its absolute path, which the tasks open.
    path: String,
    /// The part of it this item reads (None: all of it).
    range: Option<LineRange>,
}

/// Everything the scan's tasks need: the pipelines (as the build names them, and their text),
/// the files, and the options the checks read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ScanSpec {
    pipelines: Vec<(String, String)>,
    files: Vec<ScanFile>,
    seed: u64,
    max_text_bytes: usize,
    valid_frac: f64,
    test_frac: f64,
    chunk_rows: usize,
}

impl ScanSpec {
    /// The scan of `files[i]`, the files of pipeline `specs[i]`, for a build with `opts`.
    pub(crate) fn new(
        specs: &[Spec],
        files: &[Vec<std::path::PathBuf>],
        opts: &BuildOptions,
    ) -> Result<Self> {
        let mut pipelines = Vec::new();
        let mut scan_files = Vec::new();
        for (i, (spec, files)) in specs.iter().zip(files).enumerate() {
            let text = std::fs::read_to_string(&spec.path)
                .map_err(|e| Error::spec(&spec.path, format!("cannot read it again: {e}")))?;
            pipelines.push((utf8(&spec.path)?.to_string(), text));
            for f in files {
                let abs = std::fs::canonicalize(f).map_err(|e| Error::input(f, e))?;
                let ranges = match line_ranges(spec, f, opts.split_mib.saturating_mul(1 << 20))? {
                    Some(r) => r.into_iter().map(Some).collect(),
                    None => vec![None],
                };
                for range in ranges {
                    scan_files.push(ScanFile {
                        pipeline: i,
                        name: f.display().to_string(),
                        path: utf8(&abs)?.to_string(),
                        range,
                    });
                }
            }
        }
        Ok(Self {
            pipelines,
            files: scan_files,
            seed: opts.seed,
            max_text_bytes: opts.max_text_bytes,
            valid_frac: opts.valid_frac,
            test_frac: opts.test_frac,
            chunk_rows: opts.chunk_rows,
        })
    }

    /// The scan's items: input files, or ranges of one.
    pub(crate) fn items(&self) -> usize {
        self.files.len()
    }

    /// The build options the checks read.
    fn options(&self) -> BuildOptions {
        BuildOptions {
            seed: self.seed,
            max_text_bytes: self.max_text_bytes,
            valid_frac: self.valid_frac,
            test_frac: self.test_frac,
            chunk_rows: self.chunk_rows,
            ..BuildOptions::default()
        }
    }
}

fn utf8(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Options(format!("{}: not a UTF-8 path", p.display())))
}

/// The scan's rows.
pub(crate) fn schema() -> SchemaRef {
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    let u64 = |n: &str| Field::new(n, DataType::UInt64, false);
    Arc::new(Schema::new(vec![
        s("source", false),
        s("file", false),
        u64("row"),
        s("id", false),
        s("prompt", false),
        s("response_a", false),
        s("response_b", false),
        s("label", true),
        s("metadata", true),
        Field::new("swap", DataType::Boolean, false),
        s("raw_label", true),
        s("dedup_key", false),
        u64("seq"),
        Field::new("kind", DataType::UInt8, false),
        // A reject's reason and raw text.
        s("reason", true),
        s("raw", true),
        u64("n_rows"),
        u64("n_pairs"),
    ]))
}

/// One row of the scan, before it goes into [`Columns`].
#[derive(Default)]
struct Row<'a> {
    file: &'a str,
    row: u64,
    pair: Option<(&'a Pair, bool)>,
    reject: Option<&'a Reject>,
    counts: (u64, u64),
}

impl<'a> Row<'a> {
    fn reject(j: &'a Reject) -> Self {
        let (file, row) = (j.file.as_str(), j.row);
        Self {
            file,
            row,
            reject: Some(j),
            ..Self::default()
        }
    }

    fn pair(p: &'a Pair, swap: bool) -> Self {
        let (file, row) = (p.file.as_str(), p.row);
        Self {
            file,
            row,
            pair: Some((p, swap)),
            ..Self::default()
        }
    }
}

/// The scan's columns, filled row by row.
#[derive(Default)]
struct Columns {
    text: [StringBuilder; 9],
    row: UInt64Builder,
    swap: BooleanBuilder,
    keys: StringBuilder,
    seq: UInt64Builder,
    kind: UInt8Builder,
    reject: [StringBuilder; 2],
    counts: [UInt64Builder; 2],
}

impl Columns {
    fn push(&mut self, source: &str, kind: Kind, seq: u64, r: Row<'_>) {
        let p = r.pair.map(|(p, _)| p);
        let key = match p {
            Some(p) => format!("{:032x}", p.key),
            None => format!("r{seq:016x}"),
        };
        let text: [Option<&str>; 9] = [
            Some(source),
            Some(r.file),
            Some(p.map_or("", |p| &p.id)),
            Some(p.map_or("", |p| &p.prompt)),
            Some(p.map_or("", |p| &p.a)),
            Some(p.map_or("", |p| &p.b)),
            p.and_then(|p| p.label),
            p.and_then(|p| p.metadata.as_deref()),
            p.and_then(|p| p.raw_label.as_deref()),
        ];
        for (b, v) in self.text.iter_mut().zip(text) {
            b.append_option(v);
        }
        self.row.append_value(r.row);
        self.swap.append_value(r.pair.is_some_and(|(_, s)| s));
        self.seq.append_value(seq);
        self.kind.append_value(kind as u8);
        let [reason, raw] = &mut self.reject;
        reason.append_option(r.reject.map(|j| j.reason.as_str()));
        raw.append_option(r.reject.and_then(|j| j.raw.as_deref()));
        self.counts[0].append_value(r.counts.0);
        self.counts[1].append_value(r.counts.1);
        self.keys.append_value(key);
    }

    fn finish(mut self) -> Result<RecordBatch> {
        let mut t = self
            .text
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef);
        let mut next = || t.next().or_internal("scan columns");
        let (source, file, id, prompt, a, b) =
            (next()?, next()?, next()?, next()?, next()?, next()?);
        let (label, metadata, raw_label) = (next()?, next()?, next()?);
        let [reason, raw] = &mut self.reject;
        let [n_rows, n_pairs] = &mut self.counts;
        let cols: Vec<ArrayRef> = vec![
            source,
            file,
            Arc::new(self.row.finish()),
            id,
            prompt,
            a,
            b,
            label,
            metadata,
            Arc::new(self.swap.finish()),
            raw_label,
            Arc::new(self.keys.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(reason.finish()),
            Arc::new(raw.finish()),
            Arc::new(n_rows.finish()),
            Arc::new(n_pairs.finish()),
        ];
        RecordBatch::try_new(schema(), cols).or_internal("the scan's rows")
    }
}

/// One chunk's checked rows as the scan's rows, numbered from `seq` on.
fn chunk_batch(
    source: &str,
    file: &str,
    c: Checked,
    opts: &BuildOptions,
    seq: &mut u64,
) -> Result<RecordBatch> {
    let mut cols = Columns::default();
    let mut push = |kind: Kind, r: Row<'_>| {
        cols.push(source, kind, *seq, r);
        *seq += 1;
    };
    for j in &c.row_rejects {
        push(Kind::RowReject, Row::reject(j));
    }
    for p in &c.pairs {
        match p {
            Ok(p) => push(Kind::Pair, Row::pair(p, swapped(p, opts))),
            Err(j) => push(Kind::PairReject, Row::reject(j)),
        }
    }
    let counts = Row {
        file,
        counts: (c.rows_read, c.pairs.len() as u64),
        ..Row::default()
    };
    push(Kind::Counts, counts);
    cols.finish()
}

/// Reads file `i` of `spec`, sending its rows chunk by chunk.
fn read_partition(
    spec: &ScanSpec,
    i: usize,
    tx: &tokio::sync::mpsc::Sender<DfResult<RecordBatch>>,
) -> Result<()> {
    let f = spec
        .files
        .get(i)
        .or_internal("a scan partition past its files")?;
    let (path, text) = spec
        .pipelines
        .get(f.pipeline)
        .or_internal("a scan file without its pipeline")?;
    let pipeline = Spec::parse(text, Path::new(path))?;
    let mapper = Mapper::new(&pipeline)?;
    let opts = spec.options();
    let mut seq = (i as u64) << SEQ_BITS;
    let counter = Arc::new(AtomicU64::new(0));
    let name = Path::new(&f.name);
    let sink = &mut |chunk| {
        let checked = check_chunk(&pipeline, name, &mapper, chunk, &opts)?;
        let batch = chunk_batch(&pipeline.name, &f.name, checked, &opts, &mut seq)?;
        // A closed channel: the query stopped (cancelled, or failed elsewhere).
        tx.blocking_send(Ok(batch))
            .map_err(|_| Error::internal("the scan's reader was dropped"))
    };
    let path = Path::new(&f.path);
    match f.range {
        Some(r) => read_jsonl_range(&pipeline, path, &f.name, r, opts.chunk_rows, sink),
        None => read_file_as(&pipeline, path, &f.name, opts.chunk_rows, counter, sink),
    }
}

/// The scan as the project's plan leaf ([`gram_session::work`]): its items are the input files.
#[derive(Debug)]
pub(crate) struct ScanWork;

impl Work for ScanWork {
    fn name(&self) -> &'static str {
        "gram-data/scan"
    }

    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn run(
        &self,
        spec: &str,
        files: Vec<usize>,
    ) -> DfResult<BoxStream<'static, DfResult<RecordBatch>>> {
        let spec: ScanSpec = serde_json::from_str(spec)
            .map_err(|e| DataFusionError::Plan(format!("{}: {e}", self.name())))?;
        // Reading and mapping block (the mapping runs a DataFusion query of its own).
        gram_session::work::each_item("gram-scan", files, move |i, tx| {
            read_partition(&spec, i, tx)
        })
    }
}

/// The scan of `spec`'s files, as a plan's leaf.
pub(crate) fn plan(spec: &ScanSpec) -> DfResult<datafusion::logical_expr::LogicalPlan> {
    let json = serde_json::to_string(spec).map_err(|e| DataFusionError::External(e.into()))?;
    gram_session::work::plan(Arc::new(ScanWork), json, spec.items())
}
