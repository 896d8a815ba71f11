//! `gram-executor`: a Ballista executor that runs GRAM-rs's plans: the project's DataFusion
//! functions are registered, and it loads tokenizers and models from the paths the plan names
//! (a path every executor can read: a shared filesystem, or the same layout on every machine).

use std::process::ExitCode;

use clap::Parser;
use gram_cluster::ExecutorOptions;

const ENV_HELP: &str = gram_core::env_help!("  RUST_LOG  log filter (default: info)");

/// A Ballista executor with GRAM-rs's functions.
///
/// Examples:
///   gram-executor --scheduler 10.0.0.1:50050
///   gram-executor --scheduler localhost:50050 --port 50061 --grpc-port 50062 --task-slots 2
#[derive(Parser)]
#[command(name = "gram-executor", version, verbatim_doc_comment, after_help = ENV_HELP)]
struct Cli {
    /// The scheduler's HOST:PORT.
    #[arg(long, default_value = "localhost:50050")]
    scheduler: String,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    bind_host: String,
    /// Host name the scheduler and other executors reach this one by (default: this machine's
    /// name as the scheduler sees it).
    #[arg(long)]
    external_host: Option<String>,
    /// Arrow Flight port (other executors fetch shuffle data here).
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// gRPC port.
    #[arg(long, default_value_t = 50052)]
    grpc_port: u16,
    /// Concurrent tasks (default: one per core).
    #[arg(long)]
    task_slots: Option<usize>,
    /// Folder for shuffle files (default: a temporary folder).
    #[arg(long)]
    work_dir: Option<String>,
    /// Seconds between heartbeats to the scheduler (below its --executor-timeout).
    #[arg(long, default_value_t = 60)]
    heartbeat: u64,
    /// Memory DataFusion's operators in the executor's tasks may reserve, in MiB, shared out
    /// between its task slots (sorts spill to the work folder past it; 0: no limit; default:
    /// 70% of the machine's or container's memory). Not a cap on the process: tokenizers,
    /// judges and the shard writers' buffers come on top.
    #[arg(long)]
    memory_mib: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    // No quiet_on_closed_pipe(): a server must not die of SIGPIPE when a peer closes a socket.
    let cli: Cli = gram_core::cli::parse();
    gram_cluster::init_logging();
    let Some((host, port)) = cli
        .scheduler
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
    else {
        let e = format!("--scheduler {}: expected HOST:PORT", cli.scheduler);
        return gram_core::cli::exit_with(&e, true);
    };
    let slots = cli
        .task_slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let opts = ExecutorOptions {
        scheduler: (host, port),
        bind_host: cli.bind_host,
        external_host: cli.external_host,
        ports: (cli.port, cli.grpc_port),
        task_slots: slots,
        work_dir: cli.work_dir,
        heartbeat: cli.heartbeat,
        memory_bytes: cli.memory_mib.map(|m| m.saturating_mul(1 << 20)),
    };
    match gram_cluster::run_executor(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => gram_core::cli::exit_with(&e, false),
    }
}
