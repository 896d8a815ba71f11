//! `gram-data build`: sources -> raw pairs (SQL mapping, [`crate::map`]) -> checks, dedup, split
//! ([`crate::pairs`]) -> tokenised stage-1 and stage-2 rows ([`crate::stage`]) -> Parquet shards
//! and a rejects table ([`crate::shards`]), with a stats report ([`crate::stats`]). Streams in
//! chunks; writes into a temporary folder that becomes the dataset only when complete
//! ([`crate::dest`]: renamed into place, or put on an object store with the manifest last);
//! checks that every input row is either written or rejected with a reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use gram_core::GramTokenizer;
use gram_core::fit::Tokenizer;
use gram_core::schema::Dataset;
use rayon::prelude::*;
use serde::Serialize;

use crate::dedup::Seen;
use crate::dest::Dest;
use crate::error::{Error, OrInternal, Result};
use crate::map::Mapper;
use crate::pairs::check_chunk;
use crate::read::{Chunk, read_file};
use crate::scan::ScanSpec;
use crate::shards::{Outputs, Rejected, Writer, tally};
use crate::sink::SinkSpec;
use crate::spec::Spec;
use crate::stage::stage_rows;
use crate::stats::{SourceStats, Stats};

pub use crate::pairs::split_of;
pub use crate::stats::print_stats;

/// The default of [`BuildOptions::max_text_bytes`]: 1 MiB, far past any prompt or response
/// that fits a model's context.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1 << 20;

/// Everything a build needs.
#[derive(Debug, Clone, Serialize)]
pub struct BuildOptions {
    /// Pipeline spec files.
    pub pipelines: Vec<PathBuf>,
    /// Input files replacing the spec's own (only with one pipeline).
    pub inputs: Vec<PathBuf>,
    /// Output folder, or an object-store URL (`s3://BUCKET/PREFIX`, `file:///PATH`).
    pub out: PathBuf,
    /// With an object-store output: the local folder the build writes into before its files
    /// go up; None: the system's temporary folder.
    pub work_dir: Option<PathBuf>,
    /// Model folder or GGUF whose tokenizer and chat template to use; none: text only.
    pub model: Option<PathBuf>,
    /// Prompt style; None: the chat template when the tokenizer has one.
    pub chat: Option<bool>,
    /// Longest example, in tokens (texts are truncated to fit).
    pub max_tokens: usize,
    /// Reject pairs longer than this before truncation.
    pub drop_over: Option<usize>,
    /// Reject pairs with a prompt or response longer than this many bytes, before any
    /// normalising or tokenising (a runaway text would cost seconds and gigabytes).
    pub max_text_bytes: usize,
    /// Fraction of prompts in the validation split.
    pub valid_frac: f64,
    /// Fraction of prompts in the test split.
    pub test_frac: f64,
    /// Seed of the response order.
    pub seed: u64,
    /// Stage 2 presents every pair in both orders.
    pub both_orders: bool,
    /// Rows per Parquet shard.
    pub shard_rows: usize,
    /// Rows read per chunk.
    pub chunk_rows: usize,
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Tokenise in a DataFusion plan on this target (a Ballista cluster) instead of in the
    /// reading loop; None: in the loop.
    pub cluster: Option<crate::cluster::Target>,
    /// Tasks the `--cluster` plan is cut into; None: the session's target partitions.
    pub partitions: Option<usize>,
    /// With `--cluster`: an uncompressed JSON Lines file is read by one task per this many MiB.
    pub split_mib: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            pipelines: Vec::new(),
            inputs: Vec::new(),
            out: PathBuf::from("data/gram"),
            work_dir: None,
            model: None,
            chat: None,
            max_tokens: 2048,
            drop_over: None,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
            valid_frac: 0.05,
            test_frac: 0.05,
            seed: 0,
            both_orders: true,
            shard_rows: 50_000,
            chunk_rows: 4096,
            overwrite: false,
            progress: true,
            cluster: None,
            partitions: None,
            split_mib: 64,
        }
    }
}

/// Checks the options that need no file.
fn check_options(opts: &BuildOptions) -> Result<()> {
    let bad = |m: &str| Err(Error::Options(m.into()));
    if opts.pipelines.is_empty() {
        return bad(
            "no pipeline given (e.g. gram-data build pipelines/hh-rlhf.toml --out data/hh)",
        );
    }
    if !opts.inputs.is_empty() && opts.pipelines.len() != 1 {
        return bad("--input replaces one pipeline's files: give exactly one pipeline with it");
    }
    if !(0.0..1.0).contains(&(opts.valid_frac + opts.test_frac))
        || opts.valid_frac < 0.0
        || opts.test_frac < 0.0
    {
        return bad("--valid and --test fractions must be >= 0 and sum to < 1");
    }
    Ok(())
}

/// The pipelines of a build, checked before any data is read: specs, their files, their SQL.
struct Sources {
    specs: Vec<Spec>,
    files: Vec<Vec<PathBuf>>,
    mappers: Vec<Mapper>,
}

impl Sources {
    fn load(opts: &BuildOptions) -> Result<Self> {
        let specs: Vec<Spec> = opts
            .pipelines
            .iter()
            .map(|p| Spec::load(p))
            .collect::<Result<_>>()?;
        let mut names = std::collections::HashSet::new();
        for s in &specs {
            if !names.insert(s.name.clone()) {
                return Err(Error::spec(
                    &s.path,
                    format!("two pipelines are named `{}`", s.name),
                ));
            }
        }
        let files = specs
            .iter()
            .map(|s| s.resolve_files(&opts.inputs))
            .collect::<Result<_>>()?;
        let mappers = specs.iter().map(Mapper::new).collect::<Result<_>>()?;
        Ok(Self {
            specs,
            files,
            mappers,
        })
    }

    /// Bytes of every input file (what the progress bar counts).
    fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .flatten()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

/// The model's tokenizer, if one is given.
fn load_tokenizer(opts: &BuildOptions) -> Result<Option<GramTokenizer>> {
    let Some(m) = &opts.model else {
        return Ok(None);
    };
    GramTokenizer::from_path(m)
        .map(Some)
        .map_err(|source| Error::Model {
            context: format!("loading the tokenizer of {}", m.display()),
            source,
        })
}

/// The fitting tokenizer (templates and token budget) over `tok`.
fn fitting<'t>(opts: &BuildOptions, tok: &'t GramTokenizer) -> Result<Tokenizer<'t>> {
    crate::udf::fitting(tok, opts.chat, opts.max_tokens).map_err(|source| Error::Model {
        context: format!("preparing the templates of {}", tok_path(opts)),
        source,
    })
}

fn tok_path(opts: &BuildOptions) -> String {
    opts.model
        .as_ref()
        .map_or_else(String::new, |m| m.display().to_string())
}

/// Runs a build. Returns the stats (also saved as `stats.json` in the output).
pub fn build(opts: &BuildOptions) -> Result<Stats> {
    let t0 = Instant::now();
    check_options(opts)?;
    let dest = Dest::of(opts)?;
    dest.check(opts.overwrite)?;
    // Everything that can be checked is checked before any data is read.
    let sources = Sources::load(opts)?;
    if let Some(target) = &opts.cluster {
        crate::plan::check_reachable(target)?;
    }
    let tok = load_tokenizer(opts)?;
    let tokenizer = tok.as_ref().map(|t| fitting(opts, t)).transpose()?;

    let tmp = dest.prepare(opts)?;
    let total_bytes = sources.total_bytes();
    let result = Run::new(
        opts,
        tok.as_ref(),
        tokenizer.as_ref(),
        &tmp,
        t0,
        total_bytes,
    )
    .and_then(|run| match &opts.cluster {
        Some(target) => run.planned(target, &sources, &tmp, &dest),
        None => run.sources(&sources),
    })
    .and_then(|run| run.finish(&tmp, &dest))
    .and_then(|stats| dest.publish(&tmp).map(|()| stats));
    if result.is_err() {
        dest.discard(&tmp);
    }
    result
}

/// A progress bar over the input's bytes, with the rows read and their rate.
struct Progress {
    bar: indicatif::ProgressBar,
    /// Bytes of the files already finished.
    done_bytes: u64,
    t0: Instant,
}

impl Progress {
    fn new(show: bool, total_bytes: u64, t0: Instant) -> Self {
        let bar = if show {
            let b = indicatif::ProgressBar::new(total_bytes);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {bytes}/{total_bytes} {wide_bar} {msg} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        Self {
            bar,
            done_bytes: 0,
            t0,
        }
    }

    /// `in_file` bytes of the current file read, `rows` rows in all.
    fn update(&self, in_file: u64, rows: u64) {
        self.bar.set_position(self.done_bytes + in_file);
        let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
        self.bar
            .set_message(format!("{rows} rows, {:.0} rows/s", rows as f64 / secs));
    }

    fn file_done(&mut self, file: &Path) {
        self.done_bytes += std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    }
}

/// A spinner while the plan's `tasks` read tasks read the input and the plan tokenises and
/// writes its pairs on `target` (its tasks report when the job ends).
fn planned_bar(
    show: bool,
    tasks: usize,
    target: &crate::cluster::Target,
) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new_spinner();
    let template = format!(
        "{{spinner}} reading ({tasks} task(s)), tokenising and writing on {target} ({{elapsed}})"
    );
    b.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    b.enable_steady_tick(std::time::Duration::from_millis(200));
    b
}

/// One build while it streams its sources into the temporary folder.
struct Run<'a> {
    opts: &'a BuildOptions,
    tok: Option<&'a GramTokenizer>,
    tokenizer: Option<&'a Tokenizer<'a>>,
    w: Writer,
    seen: Seen,
    progress: Progress,
    /// Every Parquet file's key-value metadata.
    meta: Vec<(String, String)>,
    /// The files the plan's tasks wrote (paths relative to the output).
    task_files: Vec<String>,
    t0: Instant,
}

impl<'a> Run<'a> {
    fn new(
        opts: &'a BuildOptions,
        tok: Option<&'a GramTokenizer>,
        tokenizer: Option<&'a Tokenizer<'a>>,
        tmp: &Path,
        t0: Instant,
        total_bytes: u64,
    ) -> Result<Self> {
        let meta = Self::file_metadata(opts, tok, tokenizer)?;
        let out = Outputs::new(tmp, opts.shard_rows, &meta, "")?;
        Ok(Self {
            opts,
            tok,
            tokenizer,
            w: Writer::new(out),
            seen: Seen::default(),
            progress: Progress::new(opts.progress, total_bytes, t0),
            meta,
            task_files: Vec::new(),
            t0,
        })
    }

    /// The key-value metadata of every Parquet file written.
    fn file_metadata(
        opts: &BuildOptions,
        tok: Option<&GramTokenizer>,
        tokenizer: Option<&Tokenizer<'_>>,
    ) -> Result<Vec<(String, String)>> {
        let mut meta = vec![(
            "gram.builder".to_string(),
            format!("gram-data {}", env!("CARGO_PKG_VERSION")),
        )];
        if let (Some(t), Some(tz)) = (tok, tokenizer) {
            meta.push(("gram.tokenizer".into(), t.fingerprint()));
            let labels = serde_json::to_string(&tz.labels).or_internal("label ids as JSON")?;
            meta.push(("gram.label_ids".into(), labels));
            meta.push(("gram.max_tokens".into(), opts.max_tokens.to_string()));
        }
        Ok(meta)
    }

    /// Streams every source.
    fn sources(mut self, sources: &Sources) -> Result<Self> {
        for ((spec, files), mapper) in sources
            .specs
            .iter()
            .zip(&sources.files)
            .zip(&sources.mappers)
        {
            let mut st = SourceStats::default();
            for file in files {
                self.file(spec, file, mapper, &mut st)?;
            }
            self.w.stats.rows_read += st.rows_read;
            self.w.stats.pairs_written += st.pairs_written;
            self.w.stats.sources.insert(spec.name.clone(), st);
        }
        self.progress.bar.finish_and_clear();
        Ok(self)
    }

    /// Streams one input file of a source, chunk by chunk.
    fn file(
        &mut self,
        spec: &Spec,
        file: &Path,
        mapper: &Mapper,
        st: &mut SourceStats,
    ) -> Result<()> {
        let counter = Arc::new(AtomicU64::new(0));
        let chunk_rows = self.opts.chunk_rows;
        read_file(spec, file, chunk_rows, counter.clone(), &mut |chunk| {
            self.chunk(spec, file, mapper, st, chunk)?;
            let rows = self.w.stats.rows_read + st.rows_read;
            self.progress.update(counter.load(Ordering::Relaxed), rows);
            Ok(())
        })?;
        self.progress.file_done(file);
        Ok(())
    }

    /// One chunk: map, check, tokenise, write the stage rows and the rejects.
    fn chunk(
        &mut self,
        spec: &Spec,
        file: &Path,
        mapper: &Mapper,
        st: &mut SourceStats,
        chunk: Chunk,
    ) -> Result<()> {
        let c = check_chunk(spec, file, mapper, chunk, self.opts)?;
        st.rows_read += c.rows_read;
        st.rows_rejected += c.row_rejects.len() as u64;
        st.pairs += c.pairs.len() as u64;
        let mut rejects = c.row_rejects;
        let row_rejects = rejects.len();
        let mut checked = Vec::with_capacity(c.pairs.len());
        for p in c.pairs {
            match p {
                Ok(p) => match self.seen.first_seen(p.key, &p.file, p.row) {
                    Some(first) => rejects.push(p.duplicate(&first)),
                    None => checked.push(p),
                },
                Err(r) => rejects.push(r),
            }
        }
        let (mut s1, mut s2) = (Vec::new(), Vec::new());
        let (opts, tokenizer) = (self.opts, self.tokenizer);
        let made: Vec<_> = checked
            .into_par_iter()
            .map(|p| {
                let m = stage_rows(&p, opts, tokenizer).map_err(Rejected::Pair);
                (p, m)
            })
            .collect();
        for m in made {
            tally(m, st, (&mut s1, &mut s2), &mut rejects);
        }
        st.pairs_rejected += (rejects.len() - row_rejects) as u64;
        self.w.write_rows(&spec.name, st, &s1, &s2, &rejects)
    }

    /// With `--cluster`: the whole build as one plan on `target`, whose tasks read, check,
    /// deduplicate, tokenise and write the shards into the build's folder (or its store); adds
    /// up what they wrote.
    fn planned(
        mut self,
        target: &crate::cluster::Target,
        sources: &Sources,
        tmp: &Path,
        dest: &Dest,
    ) -> Result<Self> {
        let model = match &self.opts.model {
            Some(m) => Some(std::fs::canonicalize(m).map_err(|e| Error::input(m, e))?),
            None => None,
        };
        let sql = crate::plan::sql(self.opts, model.as_deref())?;
        let scan = ScanSpec::new(&sources.specs, &sources.files, self.opts)?;
        let t0 = Instant::now();
        let spec = SinkSpec {
            dest: dest.sink(tmp)?,
            seed: self.opts.seed,
            both_orders: self.opts.both_orders,
            drop_over: self.opts.drop_over,
            shard_rows: self.opts.shard_rows,
            labels: self.tokenizer.map(|t| (t.labels.a, t.labels.b)),
            meta: self.meta.clone(),
        };
        let bar = planned_bar(self.opts.progress, scan.items(), target);
        let parts = crate::plan::run(target, &scan, &sql, &spec, self.opts.partitions)?;
        bar.finish_and_clear();
        for s in &sources.specs {
            self.w.stats.sources.entry(s.name.clone()).or_default();
        }
        for p in parts {
            self.w.stats.absorb(&p.stats);
            self.task_files.extend(p.files);
        }
        self.w.stats.plan_seconds = Some(t0.elapsed().as_secs_f64());
        Ok(self)
    }

    /// Closes the files, removes those no writer reported, checks that no row was lost, and
    /// writes the manifest (naming every file of the dataset) and the stats.
    fn finish(self, tmp: &Path, dest: &Dest) -> Result<Stats> {
        let (mut stats, mut files) = self.w.close()?;
        files.extend(self.task_files);
        files.sort();
        dest.remove_strays(tmp, &files.iter().cloned().collect())?;
        stats.lossless = lossless(&stats);
        stats.stage1_tokens.finish();
        stats.stage2_tokens.finish();
        stats.seconds = self.t0.elapsed().as_secs_f64();
        if !stats.lossless {
            return Err(Error::internal(
                "rows in != rows written + rows rejected (see above); nothing was written",
            ));
        }
        let manifest = serde_json::json!({
            "builder": format!("gram-data {}", env!("CARGO_PKG_VERSION")),
            "schemas": {"stage1": Dataset::Stage1.tag(), "stage2": Dataset::Stage2.tag(), "rejects": Dataset::Rejects.tag()},
            "options": self.opts,
            "tokenizer": self.tok.map(GramTokenizer::fingerprint),
            "label_ids": self.tokenizer.map(|t| t.labels),
            "max_tokens": self.opts.max_tokens,
            "files": files,
        });
        for (file, value) in [
            (gram_core::schema::DATASET_MANIFEST, &manifest),
            (
                "stats.json",
                &serde_json::to_value(&stats).or_internal("stats as JSON")?,
            ),
        ] {
            let path = tmp.join(file);
            let text = serde_json::to_string_pretty(value).or_internal("JSON")?;
            gram_core::atomic_write(&path, text.as_bytes()).map_err(|e| Error::output(&path, e))?;
        }
        Ok(stats)
    }
}

/// Losslessness, checked by the tool itself: per source, pairs = written + rejected, and the
/// rejects table holds every rejected row and pair.
fn lossless(stats: &Stats) -> bool {
    let mut ok = true;
    for (name, s) in &stats.sources {
        let rows_with_pairs = s.rows_read - s.rows_rejected;
        if s.pairs != s.pairs_written + s.pairs_rejected || (s.pairs > 0 && rows_with_pairs == 0) {
            eprintln!(
                "internal error: {name}: {} pairs != {} written + {} rejected",
                s.pairs, s.pairs_written, s.pairs_rejected
            );
            ok = false;
        }
    }
    let rejected_total: u64 = stats
        .sources
        .values()
        .map(|s| s.rows_rejected + s.pairs_rejected)
        .sum();
    ok && rejected_total == stats.rejected
}
