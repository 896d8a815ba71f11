//! `gram-scheduler`: a Ballista scheduler that plans GRAM-rs's queries (it knows the project's
//! DataFusion functions). Executors (`gram-executor`) register with it; clients submit with
//! `--cluster df://HOST:PORT`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

const ENV_HELP: &str = gram_core::env_help!("  RUST_LOG  log filter (default: info)");

/// A Ballista scheduler with GRAM-rs's functions.
///
/// Examples:
///   gram-scheduler                        # listens on 0.0.0.0:50050
///   gram-scheduler --bind 127.0.0.1:50050
#[derive(Parser)]
#[command(name = "gram-scheduler", version, verbatim_doc_comment, after_help = ENV_HELP)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:50050")]
    bind: SocketAddr,
    /// Seconds without a heartbeat after which an executor is taken for dead and its tasks
    /// are run again on the others (keep it above the executors' --heartbeat).
    #[arg(long, default_value_t = 180)]
    executor_timeout: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    // No quiet_on_closed_pipe(): a server must not die of SIGPIPE when a peer closes a socket.
    let cli: Cli = gram_core::cli::parse();
    gram_cluster::init_logging();
    match gram_cluster::run_scheduler(cli.bind, cli.executor_timeout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => gram_core::cli::exit_with(&e, false),
    }
}
