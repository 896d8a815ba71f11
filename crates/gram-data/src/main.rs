//! `gram-data`: build GRAM's stage-1 and stage-2 datasets from raw preference files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gram_data::build::{BuildOptions, build, print_stats};

/// Turn raw preference files into GRAM's datasets.
#[derive(Parser)]
#[command(name = "gram-data", version, about, after_help = gram_core::env_help!())]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run pipelines (pipelines/*.toml) into tokenised stage-1 / stage-2 Parquet datasets.
    ///
    /// Writes OUT/stage1/{train,valid,test}-NNNNN.parquet, OUT/stage2/..., OUT/rejects-00000.parquet
    /// (every row that reached no dataset, with its reason), OUT/stats.json and OUT/manifest.json
    /// (which names every file). A folder appears only when the build is complete; on an object
    /// store (OUT = s3://BUCKET/PREFIX or file:///PATH) the manifest is put last, after every
    /// other file, so a dataset without one is incomplete. S3 settings come from the AWS_*
    /// environment (AWS_ENDPOINT_URL and AWS_ALLOW_HTTP=true for an S3-compatible server).
    ///
    /// Examples:
    ///   gram-data build pipelines/hh-rlhf-harmless.toml --model ./SmolLM2 --out data/hh
    ///   gram-data build pipelines/*.toml --model model.gguf --out data/all --max-tokens 1024
    ///   gram-data build pipelines/chosen-rejected.toml --input 'my/*.jsonl' --out data/mine
    ///   gram-data build pipelines/*.toml --model /shared/model.gguf --out /shared/data/all \
    ///       --cluster df://scheduler:50050
    ///   gram-data build pipelines/*.toml --model /shared/model.gguf --out s3://bucket/gram/all \
    ///       --cluster df://scheduler:50050
    #[command(verbatim_doc_comment)]
    Build {
        /// Pipeline spec files.
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
        /// Output folder, or object-store URL (s3://BUCKET/PREFIX, file:///PATH); must not exist
        /// (or hold objects) unless --overwrite.
        #[arg(long, short)]
        out: PathBuf,
        /// With an object-store OUT: the local folder the build writes into before its files go
        /// up (default: the system's temporary folder).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Model folder or .gguf whose tokenizer and chat template tokenise the data (none: text only).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Input files or globs replacing the pipeline's own (one pipeline only).
        #[arg(long = "input")]
        inputs: Vec<PathBuf>,
        /// Longest example in tokens; longer texts are cut (head and tail kept, marked).
        #[arg(long, default_value_t = 2048)]
        max_tokens: usize,
        /// Reject pairs longer than this many tokens before truncation, instead of cutting them.
        #[arg(long)]
        drop_over: Option<usize>,
        /// Reject pairs whose prompt or a response is longer than this many bytes (before
        /// tokenising).
        #[arg(long, default_value_t = gram_data::build::DEFAULT_MAX_TEXT_BYTES)]
        max_text_bytes: usize,
        /// Use the model's chat template (default: when it has one).
        #[arg(long, conflicts_with = "raw")]
        chat: bool,
        /// Plain prompts, no chat template.
        #[arg(long)]
        raw: bool,
        /// Fraction of prompts in the validation split.
        #[arg(long, default_value_t = 0.05)]
        valid: f64,
        /// Fraction of prompts in the test split.
        #[arg(long, default_value_t = 0.05)]
        test: f64,
        /// Seed of the random response order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stage 2: one (seeded random) order per pair instead of both.
        #[arg(long)]
        one_order: bool,
        /// Rows per Parquet shard.
        #[arg(long, default_value_t = 50_000)]
        shard_rows: usize,
        /// Rows read per chunk (bounds memory).
        #[arg(long, default_value_t = 4096)]
        chunk_rows: usize,
        /// Replace OUT if it exists (on an object store, the old objects are removed when the
        /// build starts).
        #[arg(long)]
        overwrite: bool,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
        /// Worker threads for reading and tokenising (default: RAYON_NUM_THREADS, else one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Run the whole build as one DataFusion plan on a Ballista cluster (df://HOST:PORT, a
        /// gram-scheduler), on a scheduler and executor in this process (`standalone`), or in
        /// this process (`local`). Its tasks read the input files (one task per file), map,
        /// check, deduplicate, tokenise and write the shards. On a cluster, the pipelines'
        /// files, the model and (for a folder OUT) OUT's parent folder must be on paths every
        /// executor reads (a shared file system); with an object-store OUT each executor puts
        /// its shards there (with the AWS_* settings of its own environment).
        #[arg(long, value_parser = gram_data::cluster::Target::parse)]
        cluster: Option<gram_data::cluster::Target>,
        /// With --cluster: tasks the plan is cut into after the pairs are repartitioned by
        /// their dedup key, each tokenising and writing its own shards. Default: the session's
        /// target partitions (on Ballista 16; locally one per core).
        #[arg(long, requires = "cluster", value_parser = clap::value_parser!(u32).range(1..))]
        partitions: Option<u32>,
        /// With --cluster: an uncompressed JSON Lines file is read by one task per this many
        /// MiB (cut at line starts; other formats and gzip: one task per file).
        #[arg(long, requires = "cluster", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        split_mib: u64,
    },
}

// The tokenizer allocates many short-lived strings and vectors per text on every core; glibc's
// allocator spent ~45% of a build's CPU time in malloc/free (perf, 20k rows). mimalloc's
// per-thread heaps avoid that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    gram_core::cli::quiet_on_closed_pipe();
    let cli = gram_core::cli::parse::<Cli>();
    let Cmd::Build {
        pipelines,
        out,
        work_dir,
        model,
        inputs,
        max_tokens,
        drop_over,
        max_text_bytes,
        chat,
        raw,
        valid,
        test,
        seed,
        one_order,
        shard_rows,
        chunk_rows,
        overwrite,
        quiet,
        threads,
        cluster,
        partitions,
        split_mib,
    } = cli.cmd;
    gram_core::cli::set_threads(threads);
    let opts = BuildOptions {
        pipelines,
        inputs,
        out: out.clone(),
        work_dir,
        model,
        chat: if chat {
            Some(true)
        } else if raw {
            Some(false)
        } else {
            None
        },
        max_tokens,
        drop_over,
        max_text_bytes,
        valid_frac: valid,
        test_frac: test,
        seed,
        both_orders: !one_order,
        shard_rows,
        chunk_rows,
        overwrite,
        progress: gram_core::cli::progress(quiet),
        cluster,
        partitions: partitions.map(|p| p as usize),
        split_mib,
    };
    match build(&opts) {
        Ok(stats) => {
            print_stats(&stats, &out);
            ExitCode::SUCCESS
        }
        Err(e) => gram_core::cli::exit_with(&e, e.is_user_error()),
    }
}
