//! `--cluster`: a job's pairs scored by a plan on a [`Target`] instead of by the judge in this
//! process. Each call stages its pairs as Parquet files under the job's parts folder (a path
//! every executor reads), runs `gram_judge` over them ([`crate::udf`]) and returns the scores in
//! the pairs' order; the job around it (chunks, resumable parts, the joined output) is the same.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, UInt64Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use gram_session::Target;

use crate::error::{Error, Result};
use crate::judge::{BatchLimits, PairScore, Scorer};

/// Files each call's pairs are staged in: the plan's tasks (at most this many run at once).
const STAGED_FILES: usize = 16;

/// Scores pairs with a plan on a cluster.
pub struct ClusterScorer {
    target: Target,
    rt: tokio::runtime::Runtime,
    ctx: SessionContext,
    /// Where calls stage their pairs.
    dir: PathBuf,
    /// The judge's folder as the executors open it (absolute).
    model: String,
    limits: BatchLimits,
    calls: AtomicUsize,
    schema: SchemaRef,
}

fn cluster_error(target: &Target, e: &dyn std::fmt::Display) -> Error {
    Error::Input(format!("--cluster {target}: {}", gram_session::one_line(e)))
}

impl ClusterScorer {
    /// A scorer on `target` for the judge at `model`, staging under `dir`. Fails at once when
    /// the target is a scheduler nothing answers at.
    pub fn new(target: Target, model: &Path, dir: &Path, limits: BatchLimits) -> Result<Self> {
        target
            .check_reachable()
            .map_err(|e| cluster_error(&target, &e))?;
        let model = std::fs::canonicalize(model).map_err(|e| Error::file(model, e))?;
        let model = model
            .to_str()
            .ok_or_else(|| Error::file(&model, "not a UTF-8 path"))?
            .to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Runtime(format!("starting tokio: {e}")))?;
        let ctx = rt
            .block_on(target.connect(&crate::udf::extensions(), None))
            .map_err(|e| cluster_error(&target, &e))?;
        let s = |n: &str| Field::new(n, DataType::Utf8, false);
        let schema = Arc::new(Schema::new(vec![
            Field::new("row", DataType::UInt64, false),
            s("prompt"),
            s("a"),
            s("b"),
        ]));
        Ok(Self {
            target,
            rt,
            ctx,
            // Absolute: executors resolve a relative path against their own working folder.
            dir: std::fs::canonicalize(dir).map_err(|e| Error::file(dir, e))?,
            model,
            limits,
            calls: AtomicUsize::new(0),
            schema,
        })
    }

    /// Writes `pairs` as up to [`STAGED_FILES`] Parquet files under a new folder.
    fn stage(&self, pairs: &[(&str, &str, &str)], dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let per_file = pairs.len().div_ceil(STAGED_FILES).max(1);
        for (k, part) in pairs.chunks(per_file).enumerate() {
            let first = (k * per_file) as u64;
            let text = |k: usize| -> ArrayRef {
                let texts = part.iter().map(|&(x, a, b)| Some([x, a, b][k]));
                Arc::new(texts.collect::<StringArray>())
            };
            let cols: Vec<ArrayRef> = vec![
                Arc::new(UInt64Array::from_iter_values(
                    first..first + part.len() as u64,
                )),
                text(0),
                text(1),
                text(2),
            ];
            let batch = RecordBatch::try_new(self.schema.clone(), cols)
                .map_err(|e| Error::Runtime(format!("staging pairs: {e}")))?;
            let path = dir.join(format!("pairs-{k:03}.parquet"));
            crate::jobs::write_parquet(&path, self.schema.clone(), std::iter::once(batch))?;
        }
        Ok(())
    }

    /// Runs the scoring query over the staged folder `dir` (table `table`).
    fn query(&self, dir: &Path, table: &str) -> Result<Vec<RecordBatch>> {
        let fail = |e: datafusion::error::DataFusionError| cluster_error(&self.target, &e);
        let path = dir
            .to_str()
            .ok_or_else(|| Error::file(dir, "not a UTF-8 path"))?;
        let sql = format!(
            "SELECT row, gram_judge('{}', {}, {}, prompt, a, b) AS s FROM {table}",
            self.model.replace('\'', "''"),
            self.limits.max_rows,
            self.limits.max_tokens
        );
        self.rt.block_on(async {
            self.ctx
                .register_parquet(table, path, ParquetReadOptions::default())
                .await
                .map_err(fail)?;
            let result = async { self.ctx.sql(&sql).await?.collect().await }.await;
            self.ctx.deregister_table(table).map_err(fail)?;
            result.map_err(fail)
        })
    }
}

/// The scores of result batches of `(row, s)`, in row order.
fn scores_of(
    batches: &[RecordBatch],
    n: usize,
) -> Result<Vec<std::result::Result<PairScore, String>>> {
    let mut out: Vec<Option<std::result::Result<PairScore, String>>> = vec![None; n];
    for b in batches {
        let row = arrow::compute::cast(b.column(0), &DataType::UInt64)
            .map_err(|e| Error::Runtime(e.to_string()))?;
        let row = row.as_primitive::<UInt64Type>();
        let s = b.column(1).as_struct();
        let f = |k: usize| s.column(k).as_primitive::<Float32Type>().clone();
        let (score_a, p_ab, p_ba) = (f(0), f(1), f(2));
        let (truncated, error) = (s.column(3).as_boolean(), s.column(4).as_string::<i32>());
        for i in 0..b.num_rows() {
            let r = row.value(i) as usize;
            let slot = out
                .get_mut(r)
                .ok_or_else(|| Error::Runtime(format!("the plan returned row {r} of {n}")))?;
            *slot = Some(if error.is_valid(i) {
                Err(error.value(i).to_string())
            } else {
                Ok(PairScore {
                    score_a: score_a.value(i),
                    p_ab: p_ab.value(i),
                    p_ba: p_ba.value(i),
                    truncated: truncated.value(i),
                })
            });
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| Error::Runtime(format!("the plan returned no row {i}"))))
        .collect()
}

impl Scorer for ClusterScorer {
    fn score_pairs(
        &self,
        pairs: &[(&str, &str, &str)],
    ) -> Result<Vec<std::result::Result<PairScore, String>>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.calls.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("cluster-{k:06}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
        }
        self.stage(pairs, &dir)?;
        let result = self
            .query(&dir, &format!("gram_pairs_{k}"))
            .and_then(|b| scores_of(&b, pairs.len()));
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}
