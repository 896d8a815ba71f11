//! Plans whose leaf is the project's own work: N numbered items (input files to read, chunks
//! of rows to score), each done where a task of the plan runs by a [`Work`] the processes
//! register. The leaf is a logical node that travels as its [`Work`]'s name and spec; its
//! physical node reads the item numbers from an in-memory table with one partition per item.
//! That table is a leaf Ballista knows how to cut, so each task gets its own items: a leaf it
//! does not know it would run whole in every task.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, RecordBatch, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError, Result as DfResult};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use crate::PlanNode;

/// One kind of work a plan's leaf does.
pub trait Work: fmt::Debug + Send + Sync {
    /// The kind's name (it tags the leaf on the wire).
    fn name(&self) -> &'static str;
    /// The rows the work puts out.
    fn schema(&self) -> SchemaRef;
    /// Items `items` of the work `spec` describes: their rows, as they come. Called where the
    /// task runs; blocking work belongs on a thread of its own ([`each_item`]).
    fn run(
        &self,
        spec: &str,
        items: Vec<usize>,
    ) -> DfResult<BoxStream<'static, DfResult<RecordBatch>>>;
}

/// The rows `f` sends for each of `items` in turn, run on a thread of its own (for work that
/// blocks: files, onnxruntime). The first item `f` fails ends the stream with its error, as
/// the client will print it ([`crate::task_error`]); `f` should stop when a send fails (the
/// query no longer reads).
pub fn each_item<F, E>(
    name: &str,
    items: Vec<usize>,
    f: F,
) -> DfResult<BoxStream<'static, DfResult<RecordBatch>>>
where
    F: Fn(usize, &tokio::sync::mpsc::Sender<DfResult<RecordBatch>>) -> Result<(), E>
        + Send
        + 'static,
    E: fmt::Display,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            for i in items {
                if let Err(e) = f(i, &tx) {
                    let _ = tx.blocking_send(Err(crate::task_error(e)));
                    return;
                }
            }
        })
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    let rows =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    Ok(rows.boxed())
}

/// The plan of `items` items of `work` described by `spec` (a leaf for a query over it).
pub fn plan(work: Arc<dyn Work>, spec: String, items: usize) -> DfResult<LogicalPlan> {
    let node = WorkLeaf::new(work, spec, items)?;
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(node),
    }))
}

/// The logical leaf.
#[derive(Debug, Clone)]
struct WorkLeaf {
    work: Arc<dyn Work>,
    spec: String,
    items: usize,
    schema: DFSchemaRef,
}

impl WorkLeaf {
    fn new(work: Arc<dyn Work>, spec: String, items: usize) -> DfResult<Self> {
        let schema = Arc::new(DFSchema::try_from(work.schema())?);
        Ok(Self {
            work,
            spec,
            items,
            schema,
        })
    }

    fn key(&self) -> (&str, &str, usize) {
        (self.work.name(), &self.spec, self.items)
    }
}

impl PartialEq for WorkLeaf {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for WorkLeaf {}

impl PartialOrd for WorkLeaf {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.key().partial_cmp(&other.key())
    }
}

impl Hash for WorkLeaf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl UserDefinedLogicalNodeCore for WorkLeaf {
    fn name(&self) -> &str {
        "GramWork"
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
        write!(f, "GramWork: {} x{}", self.work.name(), self.items)
    }

    fn with_exprs_and_inputs(&self, _: Vec<Expr>, _: Vec<LogicalPlan>) -> DfResult<Self> {
        Ok(self.clone())
    }
}

/// The physical node over the table of item numbers.
#[derive(Debug)]
struct WorkExec {
    work: Arc<dyn Work>,
    spec: String,
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

/// A table of the numbers `0..items`, one per partition.
fn item_numbers(items: usize) -> DfResult<Arc<dyn ExecutionPlan>> {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "item",
        DataType::UInt32,
        false,
    )]));
    let parts = (0..items as u32)
        .map(|i| {
            let n = Arc::new(UInt32Array::from(vec![i]));
            RecordBatch::try_new(schema.clone(), vec![n]).map(|b| vec![b])
        })
        .collect::<Result<Vec<_>, _>>()?;
    let source = MemorySourceConfig::try_new(&parts, schema, None)?;
    Ok(DataSourceExec::from_data_source(source))
}

impl WorkExec {
    fn new(work: Arc<dyn Work>, spec: String, input: Arc<dyn ExecutionPlan>) -> Self {
        let partitions = input.properties().output_partitioning().partition_count();
        let properties = PlanProperties::new(
            EquivalenceProperties::new(work.schema()),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            work,
            spec,
            input,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for WorkExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "GramWorkExec: {}", self.work.name())
    }
}

impl ExecutionPlan for WorkExec {
    fn name(&self) -> &str {
        "GramWorkExec"
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
            .map_err(|_| DataFusionError::Plan("GramWorkExec takes one input".into()))?;
        Ok(Arc::new(Self::new(
            self.work.clone(),
            self.spec.clone(),
            input,
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (work, spec) = (self.work.clone(), self.spec.clone());
        let rows = futures::stream::once(async move {
            let batches: Vec<RecordBatch> = input.try_collect().await?;
            let mut items = Vec::new();
            for b in &batches {
                let c = b.column(0).as_any().downcast_ref::<UInt32Array>();
                let c = c.ok_or_else(|| DataFusionError::Internal("GramWorkExec: items".into()))?;
                items.extend(c.values().iter().map(|&i| i as usize));
            }
            work.run(&spec, items)
        })
        .map(|r| match r {
            Ok(rows) => rows,
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        })
        .flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.work.schema(),
            rows,
        )))
    }
}

/// How a [`Work`]'s leaf is planned and travels: register one per kind, on the client, the
/// scheduler and the executors.
#[derive(Debug)]
pub struct WorkNode(pub Arc<dyn Work>);

/// The bytes of a work leaf: its item count, then its spec.
fn encode(items: usize, spec: &str) -> Vec<u8> {
    let mut b = (items as u64).to_le_bytes().to_vec();
    b.extend_from_slice(spec.as_bytes());
    b
}

fn decode(bytes: &[u8]) -> DfResult<(usize, String)> {
    let bad = || DataFusionError::Plan("GramWork: bad bytes".into());
    let (n, spec) = bytes.split_at_checked(8).ok_or_else(bad)?;
    let n = u64::from_le_bytes(n.try_into().map_err(|_| bad())?) as usize;
    let spec = String::from_utf8(spec.to_vec()).map_err(|_| bad())?;
    Ok((n, spec))
}

impl PlanNode for WorkNode {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn encode_logical(&self, node: &dyn UserDefinedLogicalNode) -> Option<DfResult<Vec<u8>>> {
        let n = node.as_any().downcast_ref::<WorkLeaf>()?;
        (n.work.name() == self.0.name()).then(|| Ok(encode(n.items, &n.spec)))
    }

    fn decode_logical(
        &self,
        bytes: &[u8],
        _inputs: &[LogicalPlan],
    ) -> DfResult<Arc<dyn UserDefinedLogicalNode>> {
        let (items, spec) = decode(bytes)?;
        Ok(Arc::new(WorkLeaf::new(self.0.clone(), spec, items)?))
    }

    fn plan(
        &self,
        node: &dyn UserDefinedLogicalNode,
        _inputs: &[Arc<dyn ExecutionPlan>],
    ) -> Option<DfResult<Arc<dyn ExecutionPlan>>> {
        let n = node.as_any().downcast_ref::<WorkLeaf>()?;
        if n.work.name() != self.0.name() {
            return None;
        }
        let exec = item_numbers(n.items)
            .map(|input| Arc::new(WorkExec::new(self.0.clone(), n.spec.clone(), input)) as _);
        Some(exec)
    }

    fn encode_physical(&self, node: &dyn ExecutionPlan) -> Option<DfResult<Vec<u8>>> {
        let n = node.downcast_ref::<WorkExec>()?;
        (n.work.name() == self.0.name()).then(|| Ok(encode(0, &n.spec)))
    }

    fn decode_physical(
        &self,
        bytes: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let (_, spec) = decode(bytes)?;
        let input = inputs
            .first()
            .ok_or_else(|| DataFusionError::Plan("GramWorkExec without its input".into()))?;
        Ok(Arc::new(WorkExec::new(self.0.clone(), spec, input.clone())))
    }
}
