//! `--cluster`: a job's chunks read, scored and written where a plan's tasks run. The plan's
//! leaf ([`gram_session::work`]) has one item per chunk still to do; a task reads its chunk's
//! rows from the input Parquet file, scores them with the judge its process opened
//! ([`crate::udf`]) exactly as a job without `--cluster` does ([`crate::jobs::score_chunk`]),
//! and writes the chunk's part (`OUTPUT.parts/part-NNNNNN.parquet`, temp + rename), returning
//! only its counts. The job around it (resuming from the parts, joining them into the output)
//! is the same as without `--cluster`.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch, RecordBatchReader, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::prelude::DataFrame;
use futures::stream::BoxStream;
use gram_session::Target;
use gram_session::work::Work;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::jobs::{Mode, output_schema, part_path, score_chunk, write_parquet};

/// What the tasks of one job need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChunkSpec {
    /// The input Parquet file (absolute).
    pub(crate) input: String,
    /// The judge's folder (absolute).
    pub(crate) model: String,
    /// Most rows and tokens per batch.
    pub(crate) limits: (usize, usize),
    pub(crate) mode: Mode,
    pub(crate) chunk_rows: usize,
    /// Rows of the job (after `--limit`).
    pub(crate) rows: usize,
    /// The parts folder (absolute).
    pub(crate) parts: String,
    /// The chunks to do (the plan's items).
    pub(crate) chunks: Vec<usize>,
}

/// One row per chunk done: its number, rows and rows without a score.
fn counts_schema() -> SchemaRef {
    let u = |n: &str| Field::new(n, DataType::UInt64, false);
    Arc::new(Schema::new(vec![u("chunk"), u("rows"), u("failed")]))
}

/// The job's chunks as the project's plan leaf.
#[derive(Debug)]
pub(crate) struct ChunkWork;

impl Work for ChunkWork {
    fn name(&self) -> &'static str {
        "gram-score/chunks"
    }

    fn schema(&self) -> SchemaRef {
        counts_schema()
    }

    fn run(
        &self,
        spec: &str,
        items: Vec<usize>,
    ) -> DfResult<BoxStream<'static, DfResult<RecordBatch>>> {
        let spec: ChunkSpec = serde_json::from_str(spec)
            .map_err(|e| DataFusionError::Plan(format!("{}: {e}", self.name())))?;
        // Reading, onnxruntime and writing block.
        gram_session::work::each_item("gram-chunks", items, move |i, tx| {
            let k = spec.chunks.get(i).ok_or_else(|| {
                Error::Runtime(format!("chunk item {i} of {}", spec.chunks.len()))
            })?;
            let counts = do_chunk(&spec, *k)?;
            // A closed channel: the query stopped (cancelled, or failed elsewhere).
            tx.blocking_send(Ok(counts))
                .map_err(|_| Error::Runtime("the chunks' reader was dropped".into()))
        })
    }
}

/// Rows `first..first + n` of the Parquet file `path`.
fn read_rows(path: &Path, first: usize, n: usize) -> Result<RecordBatch> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| {
            b.with_offset(first)
                .with_limit(n)
                .with_batch_size(n.max(1))
                .build()
        })
        .map_err(|e| Error::file(path, format!("not a readable Parquet file: {e}")))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::file(path, format!("reading rows {first}..: {e}")))?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| Error::Runtime(e.to_string()))
}

/// Reads, scores and writes chunk `k`; its counts.
fn do_chunk(spec: &ChunkSpec, k: usize) -> Result<RecordBatch> {
    let first = k * spec.chunk_rows;
    let n = spec.chunk_rows.min(spec.rows.saturating_sub(first));
    let input = Path::new(&spec.input);
    let batch = read_rows(input, first, n)?;
    if batch.num_rows() != n {
        return Err(Error::file(
            input,
            format!("rows {first}..{}: read {}", first + n, batch.num_rows()),
        ));
    }
    let setting = (spec.model.clone(), spec.limits.0, spec.limits.1);
    let judge =
        crate::udf::judge(&setting).map_err(|e| Error::Runtime(gram_session::one_line(&e)))?;
    let (cols, failed) = score_chunk(judge, &spec.mode, &batch, input, first)?;
    let schema = output_schema(&batch.schema(), &spec.mode);
    let mut all = batch.columns().to_vec();
    all.extend(cols);
    let out = RecordBatch::try_new(schema.clone(), all)
        .map_err(|e| Error::Runtime(format!("building output rows: {e}")))?;
    write_parquet(&part_path(Path::new(&spec.parts), k), schema, [out])?;
    let u = |v: usize| Arc::new(UInt64Array::from(vec![v as u64])) as _;
    RecordBatch::try_new(counts_schema(), vec![u(k), u(n), u(failed)])
        .map_err(|e| Error::Runtime(e.to_string()))
}

/// What the chunks' tasks did: rows scored, rows failed.
pub(crate) struct Done {
    pub(crate) rows: usize,
    pub(crate) failed: usize,
}

fn cluster_error(target: &Target, e: &dyn std::fmt::Display) -> Error {
    Error::Input(format!("--cluster {target}: {}", gram_session::one_line(e)))
}

/// Fails at once when `target` is a scheduler nothing answers at.
pub(crate) fn check_reachable(target: &Target) -> Result<()> {
    target
        .check_reachable()
        .map_err(|e| cluster_error(target, &e))
}

/// Runs the chunks of `spec` on `target`.
pub(crate) fn run(target: &Target, spec: &ChunkSpec) -> Result<Done> {
    let fail = |e: DataFusionError| cluster_error(target, &e);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(format!("starting tokio: {e}")))?;
    let json = serde_json::to_string(spec).map_err(|e| Error::Runtime(e.to_string()))?;
    let batches = rt.block_on(async {
        let ctx = target
            .connect(&crate::udf::extensions(), None)
            .await
            .map_err(fail)?;
        let leaf =
            gram_session::work::plan(Arc::new(ChunkWork), json, spec.chunks.len()).map_err(fail)?;
        DataFrame::new(ctx.state(), leaf)
            .collect()
            .await
            .map_err(fail)
    })?;
    let mut done = Done { rows: 0, failed: 0 };
    let mut chunks = 0;
    for b in &batches {
        let col = |i: usize| b.column(i).as_primitive::<UInt64Type>().clone();
        let (rows, failed) = (col(1), col(2));
        for i in 0..b.num_rows() {
            done.rows += rows.value(i) as usize;
            done.failed += failed.value(i) as usize;
        }
        chunks += b.num_rows();
    }
    if chunks != spec.chunks.len() {
        return Err(Error::Runtime(format!(
            "the plan did {chunks} of {} chunks",
            spec.chunks.len()
        )));
    }
    Ok(done)
}
