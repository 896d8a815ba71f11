//! Sessions whose plans may call the project's functions ([`crate::udf::functions`]): in this
//! process, on a Ballista scheduler and executor started in this process, or on a Ballista
//! cluster. gram-cluster's `gram-scheduler` and `gram-executor` serve [`session_state`].

use std::sync::Arc;

use ballista::prelude::SessionContextExt;
use ballista_core::extension::SessionConfigExt;
use datafusion::common::Result as DfResult;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{SessionConfig, SessionContext};

/// Every function the project's plans call.
pub fn functions() -> Vec<Arc<ScalarUDF>> {
    crate::udf::functions()
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

    /// A session on this target.
    pub async fn connect(&self) -> DfResult<SessionContext> {
        match self {
            Self::Local => Ok(with_functions(SessionContext::new())),
            Self::Standalone => standalone().await,
            Self::Remote(url) => remote(url).await,
        }
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
