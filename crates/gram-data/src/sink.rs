//! The plan node that writes a build's shards where its tasks run: each partition of the
//! build's plan becomes stage rows and rejects, assembled as a build without `--cluster`
//! assembles them ([`crate::plan::rows_of`]), written under names of its own
//! (`{split}-pHHHH-NNNNN.parquet`, `HHHH` from the partition's first row) into the build's
//! temporary folder, or into a folder of the task's own and then put on the object store the
//! build writes to; and counted. The node's output is one row per partition with those counts
//! and the files written, which the build adds up into its stats and its manifest. A shard
//! appears whole or not at all (renamed into place, or put in one request); a task that ran
//! twice (its executor lost) may leave files the finished run did not report, which the build
//! removes as strays ([`crate::shards::strays`]).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray, UInt32Array};
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
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::StreamExt;
use gram_session::PlanNode;
use serde::{Deserialize, Serialize};

use crate::build::BuildOptions;
use crate::error::{Error, OrInternal, Result};
use crate::pairs::hash64;
use crate::shards::{Outputs, Writer};
use crate::stats::Stats;

/// Where the partitions write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SinkDest {
    /// The build's temporary folder, as every task can reach it (absolute, shared).
    Folder(String),
    /// The object store URL of the build's output (each executor opens it with the settings
    /// of its own environment).
    Store(String),
}

/// What a partition wrote: its counts, and its files (paths relative to the output).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Part {
    pub(crate) stats: Stats,
    pub(crate) files: Vec<String>,
}

/// What a partition needs to write its part of a build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SinkSpec {
    pub(crate) dest: SinkDest,
    pub(crate) seed: u64,
    pub(crate) both_orders: bool,
    pub(crate) drop_over: Option<usize>,
    pub(crate) shard_rows: usize,
    /// Ids of `A` and `B` (with a model).
    pub(crate) labels: Option<(u32, u32)>,
    /// Every file's key-value metadata.
    pub(crate) meta: Vec<(String, String)>,
}

impl SinkSpec {
    /// The build options the pair assembly reads.
    fn options(&self) -> BuildOptions {
        BuildOptions {
            seed: self.seed,
            both_orders: self.both_orders,
            drop_over: self.drop_over,
            shard_rows: self.shard_rows,
            ..BuildOptions::default()
        }
    }
}

/// The node's output: one row per partition, with the counts of what it wrote as JSON.
fn output_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("partition", DataType::UInt32, false),
        Field::new("stats", DataType::Utf8, false),
    ]))
}

/// The logical node: write `input` (the tokenising query's rows) as the build's shards.
#[derive(Debug, Clone)]
pub(crate) struct ShardSink {
    input: LogicalPlan,
    /// The [`SinkSpec`] as JSON (how it travels, and what tells two nodes apart).
    spec: String,
    schema: DFSchemaRef,
}

impl ShardSink {
    pub(crate) fn new(input: LogicalPlan, spec: &SinkSpec) -> DfResult<Self> {
        let spec = serde_json::to_string(spec).map_err(|e| DataFusionError::External(e.into()))?;
        Self::with_spec(input, spec)
    }

    fn with_spec(input: LogicalPlan, spec: String) -> DfResult<Self> {
        let schema = Arc::new(DFSchema::try_from(output_schema())?);
        Ok(Self {
            input,
            spec,
            schema,
        })
    }
}

impl PartialEq for ShardSink {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec && self.input == other.input
    }
}

impl Eq for ShardSink {}

impl PartialOrd for ShardSink {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        match self.spec.partial_cmp(&other.spec) {
            Some(std::cmp::Ordering::Equal) => self.input.partial_cmp(&other.input),
            o => o,
        }
    }
}

impl Hash for ShardSink {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.spec.hash(state);
        self.input.hash(state);
    }
}

impl UserDefinedLogicalNodeCore for ShardSink {
    fn name(&self) -> &str {
        "GramShardSink"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "GramShardSink")
    }

    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> DfResult<Self> {
        let [input] = <[LogicalPlan; 1]>::try_from(inputs)
            .map_err(|_| DataFusionError::Plan("GramShardSink takes one input".into()))?;
        Self::with_spec(input, self.spec.clone())
    }
}

/// The physical node: each partition of `input` written as shards, one row of counts out.
#[derive(Debug)]
pub(crate) struct ShardSinkExec {
    input: Arc<dyn ExecutionPlan>,
    spec: SinkSpec,
    properties: Arc<PlanProperties>,
}

impl ShardSinkExec {
    fn new(input: Arc<dyn ExecutionPlan>, spec: SinkSpec) -> Self {
        let partitions = input.output_partitioning().partition_count();
        let properties = PlanProperties::new(
            EquivalenceProperties::new(output_schema()),
            datafusion::physical_plan::Partitioning::UnknownPartitioning(partitions),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            input,
            spec,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for ShardSinkExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.spec.dest {
            SinkDest::Folder(dir) => write!(f, "GramShardSinkExec: dir={dir}"),
            SinkDest::Store(url) => write!(f, "GramShardSinkExec: store={url}"),
        }
    }
}

impl ExecutionPlan for ShardSinkExec {
    fn name(&self) -> &str {
        "GramShardSinkExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
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
            .map_err(|_| DataFusionError::Plan("GramShardSinkExec takes one input".into()))?;
        Ok(Arc::new(Self::new(input, self.spec.clone())))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let spec = self.spec.clone();
        let written = futures::stream::once(async move {
            write_partition(&spec, partition, input)
                .await
                .map_err(gram_session::task_error)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            output_schema(),
            written,
        )))
    }
}

/// Writes one partition's pairs as stage rows and rejects (on a store: into a folder of the
/// task's own, then put there); its counts and files as the output row.
async fn write_partition(
    spec: &SinkSpec,
    partition: usize,
    input: SendableRecordBatchStream,
) -> Result<RecordBatch> {
    let part = match &spec.dest {
        SinkDest::Folder(dir) => write_rows(spec, Path::new(dir), input).await?,
        SinkDest::Store(url) => {
            let loc = gram_session::store::Location::parse(url).map_err(Error::Store)?;
            let dir = task_dir(partition);
            let written = write_rows(spec, &dir, input).await;
            let put = match &written {
                Ok(part) => loc.put_files(&dir, &part.files).await.map_err(Error::Store),
                Err(_) => Ok(()),
            };
            let _ = std::fs::remove_dir_all(&dir);
            put?;
            written?
        }
    };
    let json = serde_json::to_string(&part).or_internal("a partition's counts as JSON")?;
    RecordBatch::try_new(
        output_schema(),
        vec![
            Arc::new(UInt32Array::from(vec![partition as u32])),
            Arc::new(StringArray::from(vec![json])),
        ],
    )
    .or_internal("a partition's counts")
}

/// A folder of this task's own, for shards on their way to a store.
fn task_dir(partition: usize) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let pid = std::process::id();
    std::env::temp_dir().join(format!("gram-task-{pid}-{partition}-{nanos}"))
}

/// Writes a partition's rows as shards under `dir`: what was written.
async fn write_rows(
    spec: &SinkSpec,
    dir: &Path,
    mut input: SendableRecordBatchStream,
) -> Result<Part> {
    let opts = spec.options();
    let mut w: Option<Writer> = None;
    while let Some(batch) = input.next().await {
        let batch = batch.map_err(|e| Error::Upstream(gram_session::one_line(&e)))?;
        let items = crate::plan::rows_of(&batch, &opts, spec.labels)?;
        let Some(first) = batch_tag(&batch) else {
            continue;
        };
        let w = match &mut w {
            Some(w) => w,
            None => {
                let tag = format!("-p{:016x}", hash64(&[first.as_bytes()]));
                let out = Outputs::new(dir, spec.shard_rows, &spec.meta, &tag)?;
                w.insert(Writer::new(out))
            }
        };
        w.items(items)?;
    }
    let (stats, files) = match w {
        Some(w) => w.close()?,
        None => (Stats::default(), Vec::new()),
    };
    Ok(Part { stats, files })
}

/// What names a partition's files: the `dedup_key` of its first row (a pair's key, or a
/// reject's or count's own; the same in every run of the task).
fn batch_tag(b: &RecordBatch) -> Option<String> {
    use arrow::array::{Array, AsArray};
    let c = b.column_by_name("dedup_key")?;
    let c = arrow::compute::cast(c, &DataType::Utf8).ok()?;
    let c = c.as_string::<i32>();
    (!c.is_empty() && c.is_valid(0)).then(|| c.value(0).to_string())
}

/// What each partition wrote, from the sink's output rows.
pub(crate) fn parts(batch: &RecordBatch) -> Result<Vec<Part>> {
    use arrow::array::AsArray;
    let c = batch
        .column_by_name("stats")
        .or_internal("the sink's output has no `stats`")?;
    let c = arrow::compute::cast(c, &DataType::Utf8).or_internal("stats")?;
    c.as_string::<i32>()
        .iter()
        .map(|s| serde_json::from_str(s.unwrap_or_default()).or_internal("a partition's counts"))
        .collect()
}

/// How [`ShardSink`] is planned and travels (registered by gram-data's sessions and the
/// cluster's scheduler and executors).
#[derive(Debug)]
pub(crate) struct SinkNode;

impl PlanNode for SinkNode {
    fn name(&self) -> &'static str {
        "gram-data/shard-sink"
    }

    fn encode_logical(&self, node: &dyn UserDefinedLogicalNode) -> Option<DfResult<Vec<u8>>> {
        let n = node.as_any().downcast_ref::<ShardSink>()?;
        Some(Ok(n.spec.as_bytes().to_vec()))
    }

    fn decode_logical(
        &self,
        bytes: &[u8],
        inputs: &[LogicalPlan],
    ) -> DfResult<Arc<dyn UserDefinedLogicalNode>> {
        let input = inputs
            .first()
            .ok_or_else(|| DataFusionError::Plan("GramShardSink without its input".into()))?;
        let spec = String::from_utf8(bytes.to_vec())
            .map_err(|e| DataFusionError::Plan(format!("GramShardSink: {e}")))?;
        Ok(Arc::new(ShardSink::with_spec(input.clone(), spec)?))
    }

    fn plan(
        &self,
        node: &dyn UserDefinedLogicalNode,
        inputs: &[Arc<dyn ExecutionPlan>],
    ) -> Option<DfResult<Arc<dyn ExecutionPlan>>> {
        let n = node.as_any().downcast_ref::<ShardSink>()?;
        Some((|| {
            let input = inputs
                .first()
                .ok_or_else(|| DataFusionError::Plan("GramShardSink without its input".into()))?;
            let spec = serde_json::from_str(&n.spec)
                .map_err(|e| DataFusionError::Plan(format!("GramShardSink: {e}")))?;
            Ok(Arc::new(ShardSinkExec::new(input.clone(), spec)) as Arc<dyn ExecutionPlan>)
        })())
    }

    fn encode_physical(&self, node: &dyn ExecutionPlan) -> Option<DfResult<Vec<u8>>> {
        let n = node.downcast_ref::<ShardSinkExec>()?;
        Some(serde_json::to_vec(&n.spec).map_err(|e| DataFusionError::External(e.into())))
    }

    fn decode_physical(
        &self,
        bytes: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = inputs
            .first()
            .ok_or_else(|| DataFusionError::Plan("GramShardSinkExec without its input".into()))?;
        let spec = serde_json::from_slice(bytes)
            .map_err(|e| DataFusionError::Plan(format!("GramShardSinkExec: {e}")))?;
        Ok(Arc::new(ShardSinkExec::new(input.clone(), spec)))
    }
}
