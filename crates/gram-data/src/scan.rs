//! The plan node that reads a build's sources where its tasks run: one partition per input
//! file, each read, mapped by its pipeline's SQL and checked chunk by chunk exactly as a build
//! without `--cluster` does it ([`crate::pairs::check_chunk`]). Its rows are the checked pairs,
//! and, so that nothing is lost on the way to the writing tasks ([`crate::sink`]), the rejects
//! of reading, mapping and checking and one row of counts per chunk ([`Kind`]). Each row has a
//! `seq` that orders the whole input as the build reads it (file, then place in the file), and a
//! `dedup_key`: the pair's, or one of its own for the other kinds.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arrow::array::{
    ArrayRef, BooleanBuilder, RecordBatch, StringBuilder, UInt8Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    Expr, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use gram_session::PlanNode;
use serde::{Deserialize, Serialize};

use crate::build::BuildOptions;
use crate::error::{Error, OrInternal, Result};
use crate::map::Mapper;
use crate::pairs::{Checked, Pair, check_chunk};
use crate::read::{Reject, read_file_as};
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
                scan_files.push(ScanFile {
                    pipeline: i,
                    name: f.display().to_string(),
                    path: utf8(&abs)?.to_string(),
                });
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

    /// Input files (the scan's partitions).
    pub(crate) fn files(&self) -> usize {
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
        let r = Row {
            file: &j.file,
            row: j.row,
            reject: Some(j),
            ..Row::default()
        };
        push(Kind::RowReject, r);
    }
    for p in &c.pairs {
        match p {
            Ok(p) => {
                let r = Row {
                    file: &p.file,
                    row: p.row,
                    pair: Some((p, swapped(p, opts))),
                    ..Row::default()
                };
                push(Kind::Pair, r);
            }
            Err(j) => {
                let r = Row {
                    file: &j.file,
                    row: j.row,
                    reject: Some(j),
                    ..Row::default()
                };
                push(Kind::PairReject, r);
            }
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
    read_file_as(
        &pipeline,
        Path::new(&f.path),
        &f.name,
        opts.chunk_rows,
        counter,
        &mut |chunk| {
            let checked = check_chunk(&pipeline, name, &mapper, chunk, &opts)?;
            let batch = chunk_batch(&pipeline.name, &f.name, checked, &opts, &mut seq)?;
            // A closed channel: the query stopped (cancelled, or failed elsewhere).
            tx.blocking_send(Ok(batch))
                .map_err(|_| Error::internal("the scan's reader was dropped"))
        },
    )
}

/// The logical node: the scan of a build's sources (a leaf).
#[derive(Debug, Clone)]
pub(crate) struct Scan {
    /// The [`ScanSpec`] as JSON (how it travels, and what tells two scans apart).
    spec: String,
    schema: DFSchemaRef,
}

impl Scan {
    pub(crate) fn new(spec: &ScanSpec) -> DfResult<Self> {
        let spec = serde_json::to_string(spec).map_err(|e| DataFusionError::External(e.into()))?;
        Self::with_spec(spec)
    }

    fn with_spec(spec: String) -> DfResult<Self> {
        let schema = Arc::new(DFSchema::try_from(schema())?);
        Ok(Self { spec, schema })
    }
}

impl PartialEq for Scan {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Eq for Scan {}

impl PartialOrd for Scan {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.spec.partial_cmp(&other.spec)
    }
}

impl Hash for Scan {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.spec.hash(state);
    }
}

impl UserDefinedLogicalNodeCore for Scan {
    fn name(&self) -> &str {
        "GramScan"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        Vec::new()
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "GramScan")
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        _inputs: Vec<LogicalPlan>,
    ) -> DfResult<Self> {
        Ok(self.clone())
    }
}

/// The physical node. Its input is a table of file numbers, one per partition, in memory: a
/// leaf Ballista hands each task its own share of (it cannot cut a leaf it does not know, and
/// would run every partition of one in every task); each partition reads the files it is given.
#[derive(Debug)]
pub(crate) struct ScanExec {
    spec: ScanSpec,
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl ScanExec {
    /// The scan of `spec`, over the file numbers of its files.
    fn new(spec: ScanSpec) -> DfResult<Self> {
        use datafusion::datasource::memory::MemorySourceConfig;
        use datafusion::datasource::source::DataSourceExec;
        let schema = Arc::new(Schema::new(vec![Field::new(
            "file",
            DataType::UInt32,
            false,
        )]));
        let parts = (0..spec.files.len() as u32)
            .map(|i| {
                let n = Arc::new(arrow::array::UInt32Array::from(vec![i]));
                RecordBatch::try_new(schema.clone(), vec![n]).map(|b| vec![b])
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let source = MemorySourceConfig::try_new(&parts, schema, None)?;
        Ok(Self::with_input(
            spec,
            DataSourceExec::from_data_source(source),
        ))
    }

    fn with_input(spec: ScanSpec, input: Arc<dyn ExecutionPlan>) -> Self {
        let partitions = input.properties().output_partitioning().partition_count();
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema()),
            datafusion::physical_plan::Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            spec,
            input,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for ScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "GramScanExec: files={}", self.spec.files.len())
    }
}

impl ExecutionPlan for ScanExec {
    fn name(&self) -> &str {
        "GramScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let [input] = <[Arc<dyn ExecutionPlan>; 1]>::try_from(children)
            .map_err(|_| DataFusionError::Plan("GramScanExec takes one input".into()))?;
        Ok(Arc::new(Self::with_input(self.spec.clone(), input)))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        use futures::{StreamExt, TryStreamExt};
        let input = self.input.execute(partition, context)?;
        let spec = self.spec.clone();
        let rows = futures::stream::once(async move {
            let batches: Vec<RecordBatch> = input.try_collect().await?;
            let mut files = Vec::new();
            for b in &batches {
                let c = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::UInt32Array>();
                let c = c.ok_or_else(|| {
                    DataFusionError::Internal("GramScanExec: file numbers".into())
                })?;
                files.extend(c.values().iter().map(|&i| i as usize));
            }
            read_files(spec, files)
        })
        .map(|r| match r {
            Ok(rows) => rows,
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        })
        .flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema(), rows)))
    }
}

/// The rows of `files` (numbers into `spec`), read in a thread of their own: reading and
/// mapping are blocking work (the mapping runs a DataFusion query of its own).
fn read_files(
    spec: ScanSpec,
    files: Vec<usize>,
) -> DfResult<futures::stream::BoxStream<'static, DfResult<RecordBatch>>> {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    std::thread::Builder::new()
        .name("gram-scan".into())
        .spawn(move || {
            for i in files {
                if let Err(e) = read_partition(&spec, i, &tx) {
                    let _ = tx.blocking_send(Err(gram_session::task_error(e)));
                    return;
                }
            }
        })
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    let rows =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    Ok(rows.boxed())
}

/// How [`Scan`] is planned and travels (registered with [`crate::sink::SinkNode`]).
#[derive(Debug)]
pub(crate) struct ScanNode;

fn parse_spec(bytes: &[u8], node: &str) -> DfResult<ScanSpec> {
    serde_json::from_slice(bytes).map_err(|e| DataFusionError::Plan(format!("{node}: {e}")))
}

impl PlanNode for ScanNode {
    fn name(&self) -> &'static str {
        "gram-data/scan"
    }

    fn encode_logical(&self, node: &dyn UserDefinedLogicalNode) -> Option<DfResult<Vec<u8>>> {
        let n = node.as_any().downcast_ref::<Scan>()?;
        Some(Ok(n.spec.as_bytes().to_vec()))
    }

    fn decode_logical(
        &self,
        bytes: &[u8],
        _inputs: &[LogicalPlan],
    ) -> DfResult<Arc<dyn UserDefinedLogicalNode>> {
        let spec = String::from_utf8(bytes.to_vec())
            .map_err(|e| DataFusionError::Plan(format!("GramScan: {e}")))?;
        Ok(Arc::new(Scan::with_spec(spec)?))
    }

    fn plan(
        &self,
        node: &dyn UserDefinedLogicalNode,
        _inputs: &[Arc<dyn ExecutionPlan>],
    ) -> Option<DfResult<Arc<dyn ExecutionPlan>>> {
        let n = node.as_any().downcast_ref::<Scan>()?;
        let plan = parse_spec(n.spec.as_bytes(), "GramScan").and_then(ScanExec::new);
        Some(plan.map(|s| Arc::new(s) as _))
    }

    fn encode_physical(&self, node: &dyn ExecutionPlan) -> Option<DfResult<Vec<u8>>> {
        let n = node.downcast_ref::<ScanExec>()?;
        Some(serde_json::to_vec(&n.spec).map_err(|e| DataFusionError::External(e.into())))
    }

    fn decode_physical(
        &self,
        bytes: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = inputs
            .first()
            .ok_or_else(|| DataFusionError::Plan("GramScanExec without its input".into()))?;
        let spec = parse_spec(bytes, "GramScanExec")?;
        Ok(Arc::new(ScanExec::with_input(spec, input.clone())))
    }
}
