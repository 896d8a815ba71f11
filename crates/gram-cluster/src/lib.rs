//! gram-cluster: the Apache Ballista scheduler and executor that run GRAM-rs's plans.
//!
//! A plan that calls the project's functions (gram-data's `gram_split` and `gram_tokens`,
//! gram-score's `gram_judge`: [`functions`]) runs wherever the session that plans it and the
//! processes that execute it know them; the `gram-scheduler` and `gram-executor` binaries serve
//! Ballista's session with all of them ([`session_state`]). Clients connect through
//! [`gram_session::Target`] (`--cluster`).

use std::net::SocketAddr;
use std::sync::Arc;

use ballista_core::extension::SessionConfigExt;
use datafusion::common::Result as DfResult;
use datafusion::execution::context::SessionState;
use datafusion::prelude::{SessionConfig, SessionContext};
pub use gram_session::{Extensions, Target};

/// Every function and plan node of the project's plans.
pub fn extensions() -> Extensions {
    gram_data::cluster::extensions().and(gram_score::udf::extensions())
}

/// Ballista's session for `config` with every project function and plan node.
pub fn session_state(config: SessionConfig) -> DfResult<SessionState> {
    gram_session::session_state(config, &extensions())
}

/// A session on `target` whose plans may use every project function and plan node.
pub async fn connect(target: &Target) -> DfResult<SessionContext> {
    target.connect(&extensions(), None).await
}

/// Runs a scheduler on `addr` until the process is stopped. An executor that has not sent a
/// heartbeat for `executor_timeout` seconds is taken for dead and its tasks run again elsewhere.
pub async fn run_scheduler(
    addr: SocketAddr,
    executor_timeout: u64,
) -> ballista_core::error::Result<()> {
    use ballista_scheduler::cluster::BallistaCluster;
    use ballista_scheduler::config::SchedulerConfig;
    let executor_timeout = executor_timeout.max(2);
    let config = SchedulerConfig {
        bind_host: addr.ip().to_string(),
        bind_port: addr.port(),
        executor_timeout_seconds: executor_timeout,
        // Ballista checks for dead executors this often; it must be shorter than the timeout.
        expire_dead_executor_interval_seconds: (executor_timeout / 3).clamp(1, 15),
        no_executors_grace_period_seconds: executor_timeout,
        override_logical_codec: Some(extensions().codec()),
        override_physical_codec: Some(extensions().codec()),
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
    /// Seconds between heartbeats to the scheduler.
    pub heartbeat: u64,
    /// Memory the tasks may hold, in bytes (Some(0): no limit; None: Ballista's default, a
    /// share of the machine's memory).
    pub memory_bytes: Option<u64>,
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
        override_logical_codec: Some(extensions().codec()),
        override_physical_codec: Some(extensions().codec()),
        executor_heartbeat_interval_seconds: o.heartbeat.max(1),
        memory_pool_size: o.memory_bytes,
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
