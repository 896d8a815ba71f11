//! `gram-score`: score with an exported GRAM judge through onnxruntime.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use gram_score::jobs::{self, JobOptions, Method, Mode};
use gram_score::serve::{ReferenceFrom, ServeOptions};
use gram_score::{BatchLimits, Error, Judge, Threads};

/// Score responses with a GRAM judge exported by `gram-export onnx` (onnxruntime on the CPU).
///
/// Scores follow the GRAM paper: each pair is judged in both orders and the two probabilities
/// averaged, so score(a) = 1 - score(b) whatever the order.
#[derive(Parser)]
#[command(name = "gram-score", version, about, after_help = gram_core::env_help!(
    "  ORT_DYLIB_PATH       the onnxruntime library (default: the copy scripts/setup.sh puts",
    "                       in GRAM_CACHE)",
    "  GRAM_CACHE           that cache (default: ~/.cache/gram-rs)",
    "  RUST_LOG             serve: log filter (default: info for gram-score, warn for the rest)",
    "  GRAM_ORT_PROFILE     file prefix: write onnxruntime's per-operator profile there",
    "  GRAM_ORT_OPTIMIZED   file.onnx: write the graph as onnxruntime optimised it",
))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pairs: adds score_a, score_b, p_a_first, p_a_second, score_truncated, score_error to every row.
    ///
    /// Examples:
    ///   gram-score pairwise --model exports/judge --input pairs.parquet --output scored.parquet
    ///   gram-score pairwise --model exports/judge --input x.parquet --output y.parquet --a-col chosen --b-col rejected
    ///   gram-score pairwise --model exports/judge --input pairs.parquet --out s3://bucket/scored/pairs.parquet
    #[command(verbatim_doc_comment)]
    Pairwise {
        #[command(flatten)]
        job: JobArgs,
        /// Column of the first response.
        #[arg(long, default_value = "response_a")]
        a_col: String,
        /// Column of the second response.
        #[arg(long, default_value = "response_b")]
        b_col: String,
    },
    /// One response against a reference response: adds reward (its both-order score against the
    /// reference), p_response_first, p_response_second, score_truncated, score_error.
    ///
    /// Examples:
    ///   gram-score reference --model exports/judge --input rollouts.parquet --output rewards.parquet
    ///   gram-score reference --model exports/judge --input r.parquet --output o.parquet --reference "I cannot help with that."
    #[command(verbatim_doc_comment)]
    Reference {
        #[command(flatten)]
        job: JobArgs,
        /// Column of the response to score.
        #[arg(long, default_value = "response")]
        response_col: String,
        /// Column of the reference response.
        #[arg(long, default_value = "reference", conflicts_with = "reference")]
        reference_col: String,
        /// One reference response for every row (instead of a column).
        #[arg(long)]
        reference: Option<String>,
    },
    /// Several responses per prompt: adds best_index, scores (each candidate's score in the last
    /// comparison it played), comparisons, score_truncated, score_error.
    ///
    /// Examples:
    ///   gram-score best-of-n --model exports/judge --input cands.parquet --output best.parquet
    ///   gram-score best-of-n --model exports/judge --input c.parquet --output b.parquet --method tournament
    #[command(verbatim_doc_comment)]
    BestOfN {
        #[command(flatten)]
        job: JobArgs,
        /// Column holding the list of responses.
        #[arg(long, default_value = "responses")]
        responses_col: String,
        /// knockout: best so far against each next; tournament: pairs in parallel rounds.
        #[arg(long, value_enum, default_value = "knockout")]
        method: Method,
    },
    /// Accuracy on labeled pairs, overall, per source and per subset (table + JSON).
    ///
    /// Examples:
    ///   gram-score eval --model exports/judge --data data/gram              # its stage2/test-*.parquet
    ///   gram-score eval --model exports/judge --data data/gram --split valid --json eval.json
    ///   gram-score eval --model exports/judge --data labeled.parquet        # prompt, response_a, response_b, label
    #[command(verbatim_doc_comment)]
    Eval {
        /// Export folder (gram-export onnx --head judge).
        #[arg(long)]
        model: PathBuf,
        /// A gram-data build folder or a Parquet file.
        #[arg(long)]
        data: PathBuf,
        /// Split of a build folder.
        #[arg(long, default_value = "test")]
        split: String,
        /// Where to save the JSON report (default: printed only).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Evaluate N pairs spread evenly over the input (so every source of a build folder,
        /// written one after another, is sampled).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// HTTP reward server: POST /get_reward (OpenRLHF), POST /score/pairs, GET /health, GET /metrics.
    ///
    /// Logs one line per request on stderr (RUST_LOG sets the level, default info; --log-format
    /// json for machines). Ctrl-C or SIGTERM stops accepting, answers the requests in flight,
    /// and exits 0.
    ///
    /// Examples:
    ///   gram-score serve --model exports/judge --addr 127.0.0.1:5000 --reference "A helpful answer."
    ///   gram-score serve --model exports/judge --reference-from labels --strip-chat-template models/policy
    ///   curl -s localhost:5000/get_reward -d '{"query":["Q? A."],"prompts":["Q?"],"references":["B."]}' -H 'content-type: application/json'
    ///
    /// Environment: RUST_LOG (log filter), ORT_DYLIB_PATH (the onnxruntime library).
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Export folder.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (port 0: any free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:5000")]
    addr: std::net::SocketAddr,
    /// Reference response for /get_reward items without one of their own.
    #[arg(long)]
    reference: Option<String>,
    /// Where each /get_reward item's reference comes from: `references` (the request's
    /// `references`, else --reference) or `labels` (OpenRLHF's `labels[i]`).
    #[arg(long, value_enum, default_value = "references")]
    reference_from: ReferenceFrom,
    /// Strip this model's chat-template markup (turn markers, end of turn) from queries and
    /// prompts before scoring: a model or tokenizer folder, or a GGUF file.
    #[arg(long, value_name = "MODEL_OR_TOKENIZER")]
    strip_chat_template: Option<PathBuf>,
    /// Most pairs scored in one batch; each waiting request gets an equal share of a batch.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Milliseconds to wait for more requests before scoring a partial batch.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Most items in one request (requests are cut into batches whatever their size).
    #[arg(long, default_value_t = 65_536)]
    max_items: usize,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 256)]
    max_body_mb: usize,
    /// Seconds a client has to send a request's headers, and then its body.
    #[arg(long, default_value_t = 30)]
    read_timeout_s: u64,
    /// Most connections open at once (more wait to be accepted).
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Log lines as text or as JSON objects.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    run: RunArgs,
}

fn serve(a: ServeArgs) -> gram_score::Result<()> {
    init_logging(a.log_format, "info");
    let strip = a
        .strip_chat_template
        .map(|p| gram_score::serve::split::ChatMarkup::from_path(&p))
        .transpose()?;
    let judge = Arc::new(a.run.open(&a.model)?);
    let timeout = std::time::Duration::from_secs(a.read_timeout_s.max(1));
    let opts = ServeOptions {
        addr: a.addr,
        reference: a.reference,
        reference_from: a.reference_from,
        strip,
        batch: gram_score::serve::batcher::Limits {
            max_batch: a.max_batch,
            max_wait: std::time::Duration::from_millis(a.max_wait_ms),
        },
        max_items: a.max_items,
        max_body_bytes: a.max_body_mb.saturating_mul(1 << 20),
        body_timeout: timeout,
        conn: gram_score::serve::listen::ConnLimits {
            max_connections: a.max_connections,
            header_timeout: timeout,
        },
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::Runtime(e.to_string()))?;
    rt.block_on(gram_score::serve::serve(judge, opts))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by RUST_LOG (default: `default` for our crates, warn for the rest).
fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("warn,gram_score={default}"))
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

#[derive(Args)]
struct JobArgs {
    /// Export folder (gram-export onnx --head judge).
    #[arg(long)]
    model: PathBuf,
    /// Input Parquet file.
    #[arg(long)]
    input: PathBuf,
    /// Output Parquet file (written when the job is complete; parts in OUT.parts until then),
    /// or an object-store URL (s3://BUCKET/KEY.parquet, file:///PATH/NAME.parquet; S3 settings
    /// from the AWS_* environment), put there when the job is complete.
    #[arg(
        long = "out",
        short = 'o',
        visible_alias = "output",
        value_name = "OUT"
    )]
    output: PathBuf,
    /// Replace OUT if it exists (without it an existing OUT is an error).
    #[arg(long)]
    overwrite: bool,
    /// Make OUT a folder (or object-store prefix) of the job's parts, part-NNNNNN.parquet in
    /// input order, and a manifest.json naming them, written last, instead of one Parquet
    /// file: the rows are not read again at the end (with --cluster, the executors' parts are
    /// the output).
    #[arg(long)]
    sharded: bool,
    /// With an object-store OUT: the local folder the job writes into (its parts too) before
    /// the output goes up; default: a folder in the system's temporary folder named after OUT.
    /// With --cluster df://, give one that every executor reads.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Column of the prompt.
    #[arg(long, default_value = "prompt")]
    prompt_col: String,
    /// Score only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Also write the job's report (rows, seconds, tokens and padding processed) as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Rows per chunk: the unit of progress and of resuming a killed job.
    #[arg(long, default_value_t = 1024)]
    chunk_rows: usize,
    /// Discard the parts of an earlier, different job at OUT.parts instead of refusing.
    #[arg(long)]
    restart: bool,
    /// Score in a DataFusion plan run by a Ballista cluster (df://HOST:PORT, a gram-scheduler),
    /// by a scheduler and executor in this process (`standalone`), or by this process
    /// (`local`): one task per chunk, which reads the chunk's rows from INPUT (JSON Lines are
    /// first written as Parquet into OUT.parts), scores them with --model and writes the
    /// chunk's part into OUT.parts. So INPUT, --model and OUT.parts must be on paths every
    /// executor reads and writes (a shared file system).
    #[arg(long, value_parser = gram_session::Target::parse)]
    cluster: Option<gram_session::Target>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Cores to use (default: RAYON_NUM_THREADS, else all of them).
    #[arg(long)]
    threads: Option<usize>,
    /// onnxruntime sessions run in parallel, sharing the --threads cores (default: one per
    /// core, each single-threaded).
    #[arg(long)]
    sessions: Option<usize>,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 64)]
    batch_rows: usize,
    /// Most tokens in one batch (rows x padded width; rows are padded to their own length rounded
    /// up to 16 and batched with rows of the same padded length, so scores do not depend on
    /// the batch limits).
    #[arg(long, default_value_t = 1024)]
    batch_tokens: usize,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

impl RunArgs {
    fn open(&self, model: &std::path::Path) -> gram_score::Result<Judge> {
        let cores = gram_core::cli::set_threads(self.threads);
        let threads = Threads::split(self.sessions.unwrap_or(cores), cores);
        Judge::open(
            model,
            threads,
            BatchLimits {
                max_rows: self.batch_rows.max(1),
                max_tokens: self.batch_tokens.max(1),
            },
        )
    }
}

fn run_job(job: JobArgs, mode: Mode) -> gram_score::Result<()> {
    let out = gram_score::out::Output::new(&job.output, job.work_dir.as_deref(), job.sharded)?;
    if out.exists()? && !job.overwrite {
        return Err(Error::Input(format!(
            "{out} exists; --overwrite replaces it"
        )));
    }
    let judge = job.run.open(&job.model)?;
    let opts = JobOptions {
        input: job.input,
        output: out.local().to_path_buf(),
        limit: job.limit,
        chunk_rows: job.chunk_rows,
        restart: job.restart,
        quiet: !gram_core::cli::progress(job.run.quiet),
        cluster: job.cluster,
        sharded: job.sharded,
    };
    let r = jobs::run(&judge, &mode, &opts)?;
    out.publish()?;
    println!(
        "{} rows -> {} ({} scored now, {} of them with an error; {} from an earlier run's parts) in {:.1} s",
        r.rows,
        out,
        r.rows_scored,
        r.rows_failed,
        r.rows - r.rows_scored,
        r.seconds
    );
    if let Some(p) = job.report {
        let bytes = serde_json::to_vec_pretty(&r).map_err(|e| Error::Runtime(e.to_string()))?;
        gram_core::atomic_write(&p, &bytes)?;
    }
    Ok(())
}

// The tokenizer allocates many short-lived strings and vectors per text on every core; glibc's
// allocator spent ~45% of a build's CPU time in malloc/free (perf, 20k rows). mimalloc's
// per-thread heaps avoid that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = gram_core::cli::parse::<Cli>();
    // The server keeps Rust's default (SIGPIPE ignored): a client that hangs up must never end
    // it. The batch commands print tables that users pipe into `head`.
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        gram_core::cli::quiet_on_closed_pipe();
    }
    let res: gram_score::Result<()> = (|| match cli.cmd {
        Cmd::Pairwise { job, a_col, b_col } => {
            let mode = Mode::Pairwise {
                prompt: job.prompt_col.clone(),
                a: a_col,
                b: b_col,
            };
            run_job(job, mode)
        }
        Cmd::Reference {
            job,
            response_col,
            reference_col,
            reference,
        } => {
            let mode = Mode::Reference {
                prompt: job.prompt_col.clone(),
                response: response_col,
                reference: reference.is_none().then_some(reference_col),
                fixed: reference,
            };
            run_job(job, mode)
        }
        Cmd::BestOfN {
            job,
            responses_col,
            method,
        } => {
            let mode = Mode::BestOfN {
                prompt: job.prompt_col.clone(),
                responses: responses_col,
                method,
            };
            run_job(job, mode)
        }
        Cmd::Eval {
            model,
            data,
            split,
            json,
            limit,
            run,
        } => {
            let judge = run.open(&model)?;
            let files = gram_score::eval::input_files(&data, &split)?;
            let report = gram_score::eval::evaluate(
                &judge,
                files,
                limit,
                !gram_core::cli::progress(run.quiet),
            )?;
            print!("{}", gram_score::eval::table(&report));
            if let Some(p) = json {
                let bytes = serde_json::to_vec_pretty(&report)
                    .map_err(|e| Error::Runtime(e.to_string()))?;
                gram_core::atomic_write(&p, &bytes)?;
                println!("report: {}", p.display());
            }
            Ok(())
        }
        Cmd::Serve(args) => serve(args),
    })();
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => gram_core::cli::exit_with(&e, e.is_user_error()),
    }
}
