//! gram-session: where a GRAM-rs DataFusion plan runs. A plan that calls the project's
//! functions (gram-data's `gram_split` and `gram_tokens`, gram-score's `gram_judge`) runs
//! wherever the session that plans it and the processes that execute it know them: this
//! process ([`Target::Local`]), a Ballista scheduler and executor started in this process
//! ([`Target::Standalone`]), or a Ballista cluster ([`Target::Remote`]) whose `gram-scheduler`
//! and `gram-executor` (crate gram-cluster) serve [`session_state`] with every function.

use std::sync::Arc;

use ballista::prelude::SessionContextExt;
use ballista_core::extension::SessionConfigExt;
use datafusion::common::Result as DfResult;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{SessionConfig, SessionContext};

/// Ballista's session for `config`, with `functions` registered.
pub fn session_state(
    config: SessionConfig,
    functions: &[Arc<ScalarUDF>],
) -> DfResult<SessionState> {
    use datafusion::execution::FunctionRegistry;
    let mut state = ballista_core::utils::default_session_builder(config)?;
    for f in functions {
        state.register_udf(f.clone())?;
    }
    Ok(state)
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

    /// A session on this target whose plans may call `functions`.
    pub async fn connect(&self, functions: &[Arc<ScalarUDF>]) -> DfResult<SessionContext> {
        let ballista = || session_state(SessionConfig::new_with_ballista(), functions);
        let ctx = match self {
            Self::Local => SessionContext::new(),
            Self::Standalone => SessionContext::standalone_with_state(ballista()?).await?,
            Self::Remote(url) => SessionContext::remote_with_state(url, ballista()?).await?,
        };
        Ok(with_functions(ctx, functions))
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
/// own), for the one-line errors the tools print.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}
