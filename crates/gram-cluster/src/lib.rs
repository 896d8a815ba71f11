//! gram-cluster: GRAM-rs's DataFusion plans on an Apache Ballista cluster.
//!
//! A plan that calls the project's functions (`gram_split`, `gram_tokens`: see
//! [`gram_data::udf`]) runs wherever the session that plans it and the processes that execute
//! it know those functions. [`session_state`] is that session: Ballista's defaults plus
//! [`functions`]; the `gram-scheduler` and `gram-executor` binaries serve it, and
//! [`standalone`] runs a scheduler and executors inside the calling process (tests, one box).

use std::net::SocketAddr;
use std::sync::Arc;

use ballista::prelude::SessionContextExt;
use ballista_core::extension::SessionConfigExt;
use datafusion::common::Result as DfResult;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{SessionConfig, SessionContext};

/// Every function the project's plans call.
pub fn functions() -> Vec<Arc<ScalarUDF>> {
    gram_data::udf::functions()
}

/// Ballista's session for `config`, with the project's functions registered.
pub fn session_state(config: SessionConfig) -> DfResult<SessionState> {
    use datafusion::execution::FunctionRegistry;
    let mut state = ballista_core::utils::default_session_builder(config)?;
    for f in functions() {
        state.register_udf(f)?;
    }
    Ok(state)
}

/// A session whose queries run on a scheduler and an executor started in this process.
pub async fn standalone() -> DfResult<SessionContext> {
    let state = session_state(SessionConfig::new_with_ballista())?;
    Ok(with_functions(
        SessionContext::standalone_with_state(state).await?,
    ))
}

/// A session whose queries run on the cluster whose scheduler listens at `url`
/// (`df://HOST:PORT`).
pub async fn remote(url: &str) -> DfResult<SessionContext> {
    let state = session_state(SessionConfig::new_with_ballista())?;
    Ok(with_functions(
        SessionContext::remote_with_state(url, state).await?,
    ))
}

/// `ctx` with the project's functions registered. Ballista's client session is rebuilt from
/// the state it is given with Ballista's own function list, so the client registers ours again
/// (the scheduler and executors keep the state's).
pub fn with_functions(ctx: SessionContext) -> SessionContext {
    for f in functions() {
        ctx.register_udf((*f).clone());
    }
    ctx
}

/// Runs a scheduler on `addr` until the process is stopped.
pub async fn run_scheduler(addr: SocketAddr) -> ballista_core::error::Result<()> {
    use ballista_scheduler::cluster::BallistaCluster;
    use ballista_scheduler::config::SchedulerConfig;
    let config = SchedulerConfig {
        bind_host: addr.ip().to_string(),
        bind_port: addr.port(),
        ..Default::default()
    }
    .with_override_session_builder(Arc::new(session_state));
    let cluster = BallistaCluster::new_from_config(&config).await?;
    ballista_scheduler::scheduler_process::start_server(cluster, addr, Arc::new(config)).await
}

/// Where an executor listens and which scheduler it serves.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler's host and port.
    pub scheduler: (String, u16),
    /// Address the executor binds.
    pub bind_host: String,
    /// Host name other processes reach this executor by (default: `bind_host`).
    pub external_host: Option<String>,
    /// Arrow Flight port (shuffle data) and gRPC port.
    pub ports: (u16, u16),
    /// Concurrent tasks.
    pub task_slots: usize,
    /// Folder of shuffle files (default: a temporary folder).
    pub work_dir: Option<String>,
}

/// Runs an executor until the process is stopped.
pub async fn run_executor(o: ExecutorOptions) -> ballista_core::error::Result<()> {
    use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
    let state = session_state(SessionConfig::new_with_ballista())?;
    let registry = ballista_core::registry::BallistaFunctionRegistry::from(&state);
    let config = ExecutorProcessConfig {
        scheduler_host: o.scheduler.0,
        scheduler_port: o.scheduler.1,
        bind_host: o.bind_host,
        external_host: o.external_host,
        port: o.ports.0,
        grpc_port: o.ports.1,
        vcores: o.task_slots,
        work_dir: o.work_dir,
        override_function_registry: Some(Arc::new(registry)),
        ..Default::default()
    };
    start_executor_process(Arc::new(config)).await
}

/// Logs on stderr, filtered by `RUST_LOG` (default: info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
