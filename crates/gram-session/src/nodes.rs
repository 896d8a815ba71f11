//! The project's own plan nodes: a [`PlanNode`] says how one kind of node is planned (logical
//! to physical) and how it travels (client to scheduler as a logical node, scheduler to
//! executors as a physical one). [`Codec`] and [`Planner`] serve every registered kind next to
//! Ballista's own nodes.

use std::fmt::Debug;
use std::sync::Arc;

use datafusion::common::{DataFusionError, Result as DfResult, TableReference};
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan, UserDefinedLogicalNode};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

/// One kind of plan node of the project's.
pub trait PlanNode: Debug + Send + Sync {
    /// The kind's name; it tags the node's bytes on the wire.
    fn name(&self) -> &'static str;
    /// `node`'s bytes, if it is of this kind.
    fn encode_logical(&self, node: &dyn UserDefinedLogicalNode) -> Option<DfResult<Vec<u8>>>;
    /// A logical node of this kind from its bytes.
    fn decode_logical(
        &self,
        bytes: &[u8],
        inputs: &[LogicalPlan],
    ) -> DfResult<Arc<dyn UserDefinedLogicalNode>>;
    /// `node`'s physical plan, if it is of this kind.
    fn plan(
        &self,
        node: &dyn UserDefinedLogicalNode,
        inputs: &[Arc<dyn ExecutionPlan>],
    ) -> Option<DfResult<Arc<dyn ExecutionPlan>>>;
    /// `node`'s bytes, if it is of this kind.
    fn encode_physical(&self, node: &dyn ExecutionPlan) -> Option<DfResult<Vec<u8>>>;
    /// A physical node of this kind from its bytes.
    fn decode_physical(
        &self,
        bytes: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
    ) -> DfResult<Arc<dyn ExecutionPlan>>;
}

/// What marks the project's bytes. A protobuf message never starts with `G` (field 8 of wire
/// type 7, which does not exist), so these never collide with Ballista's own.
const MAGIC: &[u8] = b"GRAM:";

fn tagged(name: &str, bytes: Vec<u8>, buf: &mut Vec<u8>) {
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(name.as_bytes());
    buf.push(0);
    buf.extend(bytes);
}

/// The node kind named in `buf` and the node's bytes, if `buf` holds one of the project's.
fn untag<'a>(
    nodes: &'a [Arc<dyn PlanNode>],
    buf: &'a [u8],
) -> Option<DfResult<(&'a dyn PlanNode, &'a [u8])>> {
    let rest = buf.strip_prefix(MAGIC)?;
    let end = rest.iter().position(|b| *b == 0)?;
    let name = String::from_utf8_lossy(&rest[..end]);
    Some(
        nodes
            .iter()
            .find(|n| n.name() == name)
            .map(|n| (n.as_ref(), &rest[end + 1..]))
            .ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "a plan node of kind `{name}`, which this process does not know"
                ))
            }),
    )
}

/// Ballista's codecs with the project's nodes added.
#[derive(Debug)]
pub struct Codec {
    nodes: Vec<Arc<dyn PlanNode>>,
    logical: ballista_core::serde::BallistaLogicalExtensionCodec,
    physical: ballista_core::serde::BallistaPhysicalExtensionCodec,
}

impl Codec {
    /// Ballista's codecs and `nodes`.
    pub fn new(nodes: Vec<Arc<dyn PlanNode>>) -> Self {
        Self {
            nodes,
            logical: Default::default(),
            physical: Default::default(),
        }
    }
}

impl LogicalExtensionCodec for Codec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> DfResult<Extension> {
        match untag(&self.nodes, buf) {
            Some(found) => {
                let (kind, bytes) = found?;
                Ok(Extension {
                    node: kind.decode_logical(bytes, inputs)?,
                })
            }
            None => self.logical.try_decode(buf, inputs, ctx),
        }
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> DfResult<()> {
        for kind in &self.nodes {
            if let Some(bytes) = kind.encode_logical(node.node.as_ref()) {
                tagged(kind.name(), bytes?, buf);
                return Ok(());
            }
        }
        self.logical.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: datafusion::arrow::datatypes::SchemaRef,
        ctx: &TaskContext,
    ) -> DfResult<Arc<dyn datafusion::catalog::TableProvider>> {
        self.logical
            .try_decode_table_provider(buf, table_ref, schema, ctx)
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn datafusion::catalog::TableProvider>,
        buf: &mut Vec<u8>,
    ) -> DfResult<()> {
        self.logical.try_encode_table_provider(table_ref, node, buf)
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> DfResult<Arc<dyn FileFormatFactory>> {
        self.logical.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> DfResult<()> {
        self.logical.try_encode_file_format(buf, node)
    }
}

impl PhysicalExtensionCodec for Codec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        match untag(&self.nodes, buf) {
            Some(found) => {
                let (kind, bytes) = found?;
                kind.decode_physical(bytes, inputs)
            }
            None => self.physical.try_decode(buf, inputs, ctx, converter),
        }
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<()> {
        for kind in &self.nodes {
            if let Some(bytes) = kind.encode_physical(node.as_ref()) {
                tagged(kind.name(), bytes?, buf);
                return Ok(());
            }
        }
        self.physical.try_encode(node, buf, converter)
    }
}

/// Plans the project's nodes (DataFusion's own planner for everything else).
#[derive(Debug)]
pub struct Planner {
    nodes: Vec<Arc<dyn PlanNode>>,
}

impl Planner {
    /// A planner of `nodes`.
    pub fn new(nodes: Vec<Arc<dyn PlanNode>>) -> Self {
        Self { nodes }
    }
}

#[async_trait::async_trait]
impl ExtensionPlanner for Planner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn datafusion::catalog::Session,
        _ctx: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> DfResult<Option<Arc<dyn ExecutionPlan>>> {
        for kind in &self.nodes {
            if let Some(plan) = kind.plan(node, physical_inputs) {
                return plan.map(Some);
            }
        }
        Ok(None)
    }
}

/// The query planner of a session that runs plans (in this process, or on a scheduler).
#[derive(Debug)]
pub struct QueryPlanner {
    nodes: Vec<Arc<dyn PlanNode>>,
}

impl QueryPlanner {
    /// DataFusion's planner with `nodes` added.
    pub fn new(nodes: Vec<Arc<dyn PlanNode>>) -> Self {
        Self { nodes }
    }
}

#[async_trait::async_trait]
impl datafusion::execution::context::QueryPlanner for QueryPlanner {
    async fn create_physical_plan(
        &self,
        plan: &LogicalPlan,
        session: &dyn datafusion::catalog::Session,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let planner = Planner::new(self.nodes.clone());
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(planner)])
            .create_physical_plan(plan, session)
            .await
    }
}
