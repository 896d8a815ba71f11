//! gram-session: where a GRAM-rs DataFusion plan runs. A plan that calls the project's
//! functions (gram-data's `gram_split` and `gram_tokens`, gram-score's `gram_judge`) runs
//! wherever the session that plans it and the processes that execute it know them: this
//! process ([`Target::Local`]), a Ballista scheduler and executor started in this process
//! ([`Target::Standalone`]), or a Ballista cluster ([`Target::Remote`]) whose `gram-scheduler`
//! and `gram-executor` (crate gram-cluster) serve [`session_state`] with every function; and
//! where outputs go when they go to an object store ([`store`]).

use std::sync::Arc;

use ballista::prelude::SessionContextExt;
use ballista_core::extension::SessionConfigExt;
use datafusion::common::Result as DfResult;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{SessionConfig, SessionContext};

pub mod nodes;
pub mod store;
pub mod work;
pub use nodes::PlanNode;

/// What the project adds to DataFusion: functions plans call, and plan nodes of its own.
#[derive(Debug, Clone, Default)]
pub struct Extensions {
    /// Functions the plans call.
    pub functions: Vec<Arc<ScalarUDF>>,
    /// Plan nodes of the project's own.
    pub nodes: Vec<Arc<dyn PlanNode>>,
}

impl Extensions {
    /// These extensions and `other`'s.
    pub fn and(mut self, other: Extensions) -> Self {
        self.functions.extend(other.functions);
        self.nodes.extend(other.nodes);
        self
    }

    /// Ballista's codecs with these nodes added (a scheduler's and executors' codec).
    pub fn codec(&self) -> Arc<nodes::Codec> {
        Arc::new(nodes::Codec::new(self.nodes.clone()))
    }

    fn query_planner(&self) -> Arc<nodes::QueryPlanner> {
        Arc::new(nodes::QueryPlanner::new(self.nodes.clone()))
    }
}

/// Ballista's session for `config`, with `ext` registered: what a scheduler plans with and
/// what an executor runs with.
pub fn session_state(config: SessionConfig, ext: &Extensions) -> DfResult<SessionState> {
    use datafusion::execution::FunctionRegistry;
    let config = config
        .with_ballista_logical_extension_codec(ext.codec())
        .with_ballista_physical_extension_codec(ext.codec());
    let state = ballista_core::utils::default_session_builder(config)?;
    let mut state = SessionStateBuilder::new_from_existing(state)
        .with_query_planner(ext.query_planner())
        .build();
    for f in &ext.functions {
        state.register_udf(f.clone())?;
    }
    Ok(state)
}

/// A DataFusion session in this process with `ext` registered.
fn local_state(config: SessionConfig, ext: &Extensions) -> SessionState {
    SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_query_planner(ext.query_planner())
        .with_scalar_functions(ext.functions.clone())
        .build()
}

/// `ctx` with `functions` registered. Ballista's client session is rebuilt from the state it is
/// given with Ballista's own function list, so the client registers them again (the scheduler
/// and executors keep the state's).
pub fn with_functions(ctx: SessionContext, functions: &[Arc<ScalarUDF>]) -> SessionContext {
    for f in functions {
        ctx.register_udf((**f).clone());
    }
    ctx
}

/// Where a plan runs, as `--cluster` names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Target {
    /// `local`: a DataFusion session in this process.
    Local,
    /// `standalone`: a Ballista scheduler and executor in this process.
    Standalone,
    /// `df://HOST:PORT`: a Ballista scheduler.
    Remote(String),
}

impl Target {
    /// Parses `local`, `standalone` or `df://HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Self::Local),
            "standalone" => Ok(Self::Standalone),
            url if url.starts_with("df://") && url.len() > 5 => Ok(Self::Remote(url.into())),
            other => Err(format!(
                "--cluster `{other}`: give df://HOST:PORT (a gram-scheduler), `standalone` or `local`"
            )),
        }
    }

    /// A session on this target whose plans may use `ext`, cut into `partitions` partitions
    /// (None: DataFusion's default, one per core here; Ballista's, 16). A Ballista client sends
    /// its settings with every job, so the scheduler plans with the same number.
    pub async fn connect(
        &self,
        ext: &Extensions,
        partitions: Option<usize>,
    ) -> DfResult<SessionContext> {
        let config = |c: SessionConfig| match partitions {
            Some(n) => c.with_target_partitions(n),
            None => c,
        };
        let ballista = || session_state(config(SessionConfig::new_with_ballista()), ext);
        let ctx = match self {
            Self::Local => {
                let state = local_state(config(SessionConfig::new()), ext);
                return Ok(SessionContext::new_with_state(state));
            }
            Self::Standalone => SessionContext::standalone_with_state(ballista()?).await?,
            Self::Remote(url) => SessionContext::remote_with_state(url, ballista()?).await?,
        };
        Ok(with_functions(ctx, &ext.functions))
    }

    /// Fails early, before any work, when this is a scheduler nothing answers at (a TCP
    /// connection to its address; a session itself only connects when a query runs).
    pub fn check_reachable(&self) -> Result<(), String> {
        use std::net::ToSocketAddrs;
        let Self::Remote(url) = self else {
            return Ok(());
        };
        let hostport = url.trim_start_matches("df://").trim_end_matches('/');
        let addrs: Vec<_> = hostport
            .to_socket_addrs()
            .map_err(|e| format!("`{hostport}` is not a reachable HOST:PORT: {e}"))?
            .collect();
        let timeout = std::time::Duration::from_secs(10);
        let mut last = None;
        for a in &addrs {
            match std::net::TcpStream::connect_timeout(a, timeout) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(format!(
            "no scheduler answers at {hostport}: {}",
            last.map_or_else(|| "no address".to_string(), |e| e.to_string())
        ))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local => f.write_str("local"),
            Self::Standalone => f.write_str("standalone"),
            Self::Remote(url) => f.write_str(url),
        }
    }
}

/// A DataFusion or Ballista error on one line (gRPC statuses carry details on lines of their
/// own), for the one-line errors the tools print; a [`task_error`] comes out as its own text.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    if let Some((_, rest)) = text.split_once(TaskError::OPEN)
        && let Some((msg, _)) = rest.split_once(TaskError::CLOSE)
    {
        return msg.to_string();
    }
    text.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// The error of a task of one of the project's plans, whose text reaches the client whole:
/// Ballista passes a failed task's error on as its debug text, which for this type is the
/// message between two marks that [`one_line`] finds.
pub struct TaskError(String);

impl TaskError {
    const OPEN: &str = "<<gram: ";
    const CLOSE: &str = " :gram>>";
}

impl std::fmt::Debug for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}{}", Self::OPEN, self.0, Self::CLOSE)
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for TaskError {}

/// A task's failure with message `e`, as the client will print it.
pub fn task_error(e: impl std::fmt::Display) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::External(Box::new(TaskError(e.to_string())))
}
