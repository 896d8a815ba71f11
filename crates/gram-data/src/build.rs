//! `gram-data build`: sources -> raw pairs (SQL mapping) -> checks, dedup, split, order ->
//! tokenised stage-1 and stage-2 Parquet shards, a rejects table and a stats report. Streams in
//! chunks; writes into a temporary folder renamed into place at the end; checks that every input
//! row is either written or rejected with a reason.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use arrow::array::{
    ArrayRef, BooleanBuilder, ListBuilder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow::record_batch::RecordBatch;
use gram_core::schema::Dataset;
use gram_core::{GramTokenizer, PromptStyle, Templates};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;
use serde::Serialize;

use crate::map::{MappedPair, Mapper};
use crate::read::{Reject, read_file};
use crate::spec::Spec;
use gram_core::fit::{Tokenizer, Tokens};

/// Everything a build needs.
#[derive(Debug, Clone, Serialize)]
pub struct BuildOptions {
    /// Pipeline spec files.
    pub pipelines: Vec<PathBuf>,
    /// Input files replacing the spec's own (only with one pipeline).
    pub inputs: Vec<PathBuf>,
    /// Output folder.
    pub out: PathBuf,
    /// Model folder or GGUF whose tokenizer and chat template to use; none: text only.
    pub model: Option<PathBuf>,
    /// Prompt style; None: the chat template when the tokenizer has one.
    pub chat: Option<bool>,
    /// Longest example, in tokens (texts are truncated to fit).
    pub max_tokens: usize,
    /// Reject pairs longer than this before truncation.
    pub drop_over: Option<usize>,
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
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            pipelines: Vec::new(),
            inputs: Vec::new(),
            out: PathBuf::from("data/gram"),
            model: None,
            chat: None,
            max_tokens: 2048,
            drop_over: None,
            valid_frac: 0.05,
            test_frac: 0.05,
            seed: 0,
            both_orders: true,
            shard_rows: 50_000,
            chunk_rows: 4096,
            overwrite: false,
            progress: true,
        }
    }
}

/// Counts of one source.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SourceStats {
    /// Input rows read (JSONL lines, array elements, CSV records, Parquet rows).
    pub rows_read: u64,
    /// Input rows rejected before mapping (unreadable, mistyped) or mapped to no pair.
    pub rows_rejected: u64,
    /// Pairs the mapping produced.
    pub pairs: u64,
    /// Pairs that reached the datasets.
    pub pairs_written: u64,
    /// Pairs rejected (by reason).
    pub pairs_rejected: u64,
    /// Rejects by reason (reasons with row-specific detail are grouped by their first words).
    pub reject_reasons: BTreeMap<String, u64>,
    /// Pairs by split.
    pub splits: BTreeMap<String, u64>,
    /// Pairs by label.
    pub labels: BTreeMap<String, u64>,
}

/// Token-length distribution of a dataset.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LengthStats {
    /// Examples.
    pub count: u64,
    /// Truncated examples.
    pub truncated: u64,
    /// Tokens in all examples.
    pub total: u64,
    /// Percentiles of the token count: p50, p90, p99, max.
    pub p50: u32,
    /// 90th percentile.
    pub p90: u32,
    /// 99th percentile.
    pub p99: u32,
    /// Longest.
    pub max: u32,
    #[serde(skip)]
    hist: BTreeMap<u32, u64>,
}

impl LengthStats {
    fn add(&mut self, n: usize, truncated: bool) {
        self.count += 1;
        self.truncated += u64::from(truncated);
        self.total += n as u64;
        *self.hist.entry(n as u32).or_default() += 1;
    }
    fn finish(&mut self) {
        let q = |p: f64, h: &BTreeMap<u32, u64>, count: u64| {
            let want = ((count as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (&k, &v) in h {
                seen += v;
                if seen >= want {
                    return k;
                }
            }
            0
        };
        self.p50 = q(0.5, &self.hist, self.count);
        self.p90 = q(0.9, &self.hist, self.count);
        self.p99 = q(0.99, &self.hist, self.count);
        self.max = self.hist.keys().next_back().copied().unwrap_or(0);
    }
}

/// The stats report, printed and saved as `stats.json`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    /// Per source (pipeline name).
    pub sources: BTreeMap<String, SourceStats>,
    /// Stage-1 rows by split.
    pub stage1: BTreeMap<String, u64>,
    /// Stage-2 rows by split.
    pub stage2: BTreeMap<String, u64>,
    /// Stage-1 token lengths.
    pub stage1_tokens: LengthStats,
    /// Stage-2 token lengths.
    pub stage2_tokens: LengthStats,
    /// Input rows in total.
    pub rows_read: u64,
    /// Rejected rows and pairs in total (= rows of rejects.parquet).
    pub rejected: u64,
    /// Pairs written.
    pub pairs_written: u64,
    /// rows_read = rows that produced pairs + rows rejected, and pairs = written + rejected.
    pub lossless: bool,
    /// Seconds the build took.
    pub seconds: f64,
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let b = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b.as_bytes()[..8]);
    u64::from_le_bytes(x)
}

/// The split of a prompt: a hash of its normalised text, so a prompt never crosses splits and the
/// split does not depend on the seed or the order of the input.
pub fn split_of(prompt: &str, valid: f64, test: f64) -> &'static str {
    let u = (hash64(&[norm(prompt).as_bytes()]) >> 11) as f64 / (1u64 << 53) as f64;
    if u < test {
        "test"
    } else if u < test + valid {
        "valid"
    } else {
        "train"
    }
}

fn reason_key(r: &str) -> String {
    // Group reasons of one kind; row-specific detail (ids, parser positions) is dropped.
    let r = match r.strip_prefix("pair ") {
        Some(rest) => rest.split_once(": ").map_or(rest, |(_, why)| why),
        None => r,
    };
    if r.starts_with("malformed JSON") {
        return "malformed JSON".into();
    }
    if r.starts_with("duplicate of pair") {
        return "duplicate of an earlier pair".into();
    }
    r.chars().take(80).collect()
}

/// A Parquet writer that rolls over every `rows` rows.
struct Shards {
    dir: PathBuf,
    prefix: String,
    rows_per_shard: usize,
    schema: arrow::datatypes::SchemaRef,
    props: WriterProperties,
    index: usize,
    rows_in_shard: usize,
    writer: Option<ArrowWriter<File>>,
}

impl Shards {
    fn new(
        dir: PathBuf,
        prefix: &str,
        dataset: Dataset,
        rows_per_shard: usize,
        meta: &[(String, String)],
    ) -> Self {
        let mut kv: Vec<parquet::file::metadata::KeyValue> = meta
            .iter()
            .map(|(k, v)| parquet::file::metadata::KeyValue::new(k.clone(), v.clone()))
            .collect();
        kv.push(parquet::file::metadata::KeyValue::new(
            "gram.schema".into(),
            dataset.tag(),
        ));
        let props = WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
            .set_key_value_metadata(Some(kv))
            .build();
        Self {
            dir,
            prefix: prefix.into(),
            rows_per_shard: rows_per_shard.max(1),
            schema: dataset.schema(),
            props,
            index: 0,
            rows_in_shard: 0,
            writer: None,
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut start = 0;
        while start < batch.num_rows() {
            if self.writer.is_none() {
                let p = self
                    .dir
                    .join(format!("{}-{:05}.parquet", self.prefix, self.index));
                let f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
                self.writer = Some(ArrowWriter::try_new(
                    f,
                    self.schema.clone(),
                    Some(self.props.clone()),
                )?);
                self.index += 1;
                self.rows_in_shard = 0;
            }
            let take = (self.rows_per_shard - self.rows_in_shard).min(batch.num_rows() - start);
            if let Some(w) = self.writer.as_mut() {
                w.write(&batch.slice(start, take))?;
            }
            self.rows_in_shard += take;
            start += take;
            if self.rows_in_shard >= self.rows_per_shard {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            w.close()?;
        }
        Ok(())
    }
}

/// One row of a stage dataset, before it is columnised.
struct StageRow {
    id: String,
    pair_id: String,
    source: String,
    split: &'static str,
    prompt: String,
    a: String,
    b: String,
    label: Option<&'static str>,
    swapped: bool,
    tokens: Option<Tokens>,
    label_token: Option<u32>,
    metadata: Option<String>,
}

fn stage_batch(rows: &[&StageRow], dataset: Dataset) -> Result<RecordBatch> {
    let mut c: Vec<StringBuilder> = (0..7).map(|_| StringBuilder::new()).collect();
    let mut label = StringBuilder::new();
    let mut swapped = BooleanBuilder::new();
    let mut ids = ListBuilder::new(UInt32Builder::new());
    let mut plen = UInt32Builder::new();
    let mut ltok = UInt32Builder::new();
    let mut ntok = UInt32Builder::new();
    let mut trunc = BooleanBuilder::new();
    let mut meta = StringBuilder::new();
    for r in rows {
        for (b, v) in c.iter_mut().zip([
            &r.id,
            &r.pair_id,
            &r.source,
            &r.split.to_string(),
            &r.prompt,
            &r.a,
            &r.b,
        ]) {
            b.append_value(v);
        }
        label.append_option(r.label);
        swapped.append_value(r.swapped);
        match &r.tokens {
            Some(t) => {
                ids.values().append_slice(&t.ids);
                ids.append(true);
                plen.append_value(t.prompt_len as u32);
                ntok.append_value(t.ids.len() as u32);
                trunc.append_value(t.truncated);
            }
            None => {
                ids.append(false);
                plen.append_null();
                ntok.append_null();
                trunc.append_null();
            }
        }
        ltok.append_option(r.label_token);
        meta.append_option(r.metadata.as_deref());
    }
    let mut cols: Vec<ArrayRef> = c
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    match dataset {
        Dataset::Stage1 => {
            cols.push(Arc::new(swapped.finish()));
            cols.push(Arc::new(ids.finish()));
            cols.push(Arc::new(plen.finish()));
        }
        _ => {
            cols.push(Arc::new(label.finish()));
            cols.push(Arc::new(swapped.finish()));
            cols.push(Arc::new(ids.finish()));
            cols.push(Arc::new(ltok.finish()));
        }
    }
    cols.push(Arc::new(ntok.finish()));
    cols.push(Arc::new(trunc.finish()));
    if dataset == Dataset::Stage2 {
        cols.push(Arc::new(meta.finish()));
    }
    Ok(RecordBatch::try_new(dataset.schema(), cols)?)
}

fn rejects_batch(source: &str, rejects: &[Reject]) -> Result<RecordBatch> {
    let (mut s, mut f, mut row, mut reason, mut raw) = (
        StringBuilder::new(),
        StringBuilder::new(),
        UInt64Builder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    for r in rejects {
        s.append_value(source);
        f.append_value(&r.file);
        row.append_value(r.row);
        reason.append_value(&r.reason);
        raw.append_option(r.raw.as_deref());
    }
    Ok(RecordBatch::try_new(
        Dataset::Rejects.schema(),
        vec![
            Arc::new(s.finish()),
            Arc::new(f.finish()),
            Arc::new(row.finish()),
            Arc::new(reason.finish()),
            Arc::new(raw.finish()),
        ],
    )?)
}

/// A checked pair, ready for the stages.
struct Pair {
    /// Input file and row it came from (for rejects).
    file: String,
    row: u64,
    id: String,
    source: String,
    split: &'static str,
    prompt: String,
    a: String,
    b: String,
    label: Option<&'static str>,
    /// The raw pair's metadata (JSON), carried into stage 2.
    metadata: Option<String>,
}

/// Runs a build. Returns the stats (also saved as `stats.json` in the output folder).
pub fn build(opts: &BuildOptions) -> Result<Stats> {
    let t0 = std::time::Instant::now();
    if opts.pipelines.is_empty() {
        bail!("no pipeline given (e.g. gram-data build pipelines/hh-rlhf.toml --out data/hh)");
    }
    if !opts.inputs.is_empty() && opts.pipelines.len() != 1 {
        bail!("--input replaces one pipeline's files: give exactly one pipeline with it");
    }
    if !(0.0..1.0).contains(&(opts.valid_frac + opts.test_frac))
        || opts.valid_frac < 0.0
        || opts.test_frac < 0.0
    {
        bail!("--valid and --test fractions must be >= 0 and sum to < 1");
    }
    if opts.out.exists() && !opts.overwrite {
        bail!(
            "{} already exists (use --overwrite to replace it)",
            opts.out.display()
        );
    }
    // Everything that can be checked is checked before any data is read.
    let specs: Vec<Spec> = opts
        .pipelines
        .iter()
        .map(|p| Spec::load(p))
        .collect::<Result<_>>()?;
    let mut names = std::collections::HashSet::new();
    for s in &specs {
        if !names.insert(s.name.clone()) {
            bail!("two pipelines are named `{}`", s.name);
        }
    }
    let files: Vec<Vec<PathBuf>> = specs
        .iter()
        .map(|s| s.resolve_files(&opts.inputs))
        .collect::<Result<_>>()?;
    let mappers: Vec<Mapper> = specs.iter().map(Mapper::new).collect::<Result<_>>()?;
    let tok = match &opts.model {
        Some(m) => Some(
            GramTokenizer::from_path(m)
                .with_context(|| format!("loading the tokenizer of {}", m.display()))?,
        ),
        None => None,
    };
    let tokenizer = match &tok {
        Some(t) => {
            let templates = match opts.chat {
                Some(true) => Templates::new(t, PromptStyle::Chat)?,
                Some(false) => Templates::new(t, PromptStyle::Raw)?,
                None => Templates::auto(t),
            };
            Some(Tokenizer::new(t, templates, opts.max_tokens)?)
        }
        None => None,
    };

    let parent = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = opts
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("out");
    remove_stale_partials(parent, name);
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(tmp.join("stage1"))?;
    std::fs::create_dir_all(tmp.join("stage2"))?;
    let result = run(
        opts,
        &specs,
        &files,
        &mappers,
        tok.as_ref(),
        tokenizer.as_ref(),
        &tmp,
        t0,
    );
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if opts.out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(&opts.out, &old)
            .with_context(|| format!("moving the old {} aside", opts.out.display()))?;
        std::fs::rename(&tmp, &opts.out)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, &opts.out)
            .with_context(|| format!("moving the build into {}", opts.out.display()))?;
    }
    Ok(stats)
}

/// Removes `.NAME.partial-PID` folders that killed builds left behind (their process is gone).
fn remove_stale_partials(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = format!(".{name}.partial-");
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    opts: &BuildOptions,
    specs: &[Spec],
    files: &[Vec<PathBuf>],
    mappers: &[Mapper],
    tok: Option<&GramTokenizer>,
    tokenizer: Option<&Tokenizer<'_>>,
    tmp: &Path,
    t0: std::time::Instant,
) -> Result<Stats> {
    let mut meta = vec![(
        "gram.builder".to_string(),
        format!("gram-data {}", env!("CARGO_PKG_VERSION")),
    )];
    if let (Some(t), Some(tz)) = (tok, tokenizer) {
        meta.push(("gram.tokenizer".into(), t.fingerprint()));
        meta.push(("gram.label_ids".into(), serde_json::to_string(&tz.labels)?));
        meta.push(("gram.max_tokens".into(), opts.max_tokens.to_string()));
    }
    let mut writers: HashMap<(Dataset, &'static str), Shards> = HashMap::new();
    for split in ["train", "valid", "test"] {
        writers.insert(
            (Dataset::Stage1, split),
            Shards::new(
                tmp.join("stage1"),
                split,
                Dataset::Stage1,
                opts.shard_rows,
                &meta,
            ),
        );
        writers.insert(
            (Dataset::Stage2, split),
            Shards::new(
                tmp.join("stage2"),
                split,
                Dataset::Stage2,
                opts.shard_rows,
                &meta,
            ),
        );
    }
    let mut rejects_w = Shards::new(
        tmp.to_path_buf(),
        "rejects",
        Dataset::Rejects,
        usize::MAX,
        &meta,
    );
    let mut stats = Stats::default();
    let mut seen = Seen::default();

    let total_bytes: u64 = files
        .iter()
        .flatten()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = if opts.progress {
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
    let mut done_bytes = 0u64;

    for ((spec, files), mapper) in specs.iter().zip(files).zip(mappers) {
        let mut st = SourceStats::default();
        for file in files {
            let counter = Arc::new(AtomicU64::new(0));
            let mut sink = |chunk: crate::read::Chunk| -> Result<()> {
                let mut rejects: Vec<Reject> = chunk.rejects;
                let read_rows = chunk.batch.num_rows() as u64 + rejects.len() as u64;
                st.rows_read += read_rows;
                let in_rows: Vec<(String, u64)> = {
                    use arrow::array::AsArray;
                    let f = chunk
                        .batch
                        .column_by_name("_file")
                        .context("_file")?
                        .as_string::<i32>()
                        .clone();
                    let r = chunk
                        .batch
                        .column_by_name("_row")
                        .context("_row")?
                        .as_primitive::<arrow::datatypes::UInt64Type>()
                        .clone();
                    (0..chunk.batch.num_rows())
                        .map(|i| (f.value(i).to_string(), r.value(i)))
                        .collect()
                };
                let mapped = mapper.map(chunk.batch).with_context(|| {
                    format!("{}: mapping {}", spec.path.display(), file.display())
                })?;
                // Each pair's index within its input row (part of its id); the keys are the rows
                // that produced pairs.
                let mut per_row: HashMap<(String, u64), u32> = HashMap::new();
                let indexed: Vec<(MappedPair, u32)> = mapped
                    .into_iter()
                    .map(|m| {
                        let k = per_row.entry((m.file.clone(), m.row)).or_default();
                        *k += 1;
                        let idx = *k - 1;
                        (m, idx)
                    })
                    .collect();
                // Rows the mapping turned into no pair are rejected, never dropped silently.
                for (f, r) in &in_rows {
                    if !per_row.contains_key(&(f.clone(), *r)) {
                        rejects.push(Reject {
                            file: f.clone(),
                            row: *r,
                            reason: "the pipeline's mapping produced no pair for this row".into(),
                            raw: None,
                        });
                    }
                }
                st.rows_rejected += rejects.len() as u64;
                let row_rejects = rejects.len();
                st.pairs += indexed.len() as u64;
                let mut pairs = Vec::with_capacity(indexed.len());
                for (m, idx) in indexed {
                    match check_pair(m, idx, spec, opts, &mut seen) {
                        Ok(p) => pairs.push(p),
                        Err(r) => rejects.push(r),
                    }
                }
                // Tokenise in parallel; a pair that cannot be tokenised within the limits is rejected.
                let made: Vec<Result<(Vec<StageRow>, Vec<StageRow>)>> = pairs
                    .par_iter()
                    .map(|p| stage_rows(p, opts, tokenizer))
                    .collect();
                let mut s1 = Vec::new();
                let mut s2 = Vec::new();
                for (p, m) in pairs.iter().zip(made) {
                    match m {
                        Ok((a, b)) => {
                            st.pairs_written += 1;
                            *st.splits.entry(p.split.to_string()).or_default() += 1;
                            *st.labels
                                .entry(p.label.unwrap_or("none").to_string())
                                .or_default() += 1;
                            s1.extend(a);
                            s2.extend(b);
                        }
                        Err(e) => rejects.push(Reject {
                            file: p.file.clone(),
                            row: p.row,
                            reason: format!("pair {}: {e:#}", p.id),
                            raw: None,
                        }),
                    }
                }
                st.pairs_rejected += (rejects.len() - row_rejects) as u64;
                for r in &rejects {
                    *st.reject_reasons.entry(reason_key(&r.reason)).or_default() += 1;
                }
                for (ds, rows) in [(Dataset::Stage1, &s1), (Dataset::Stage2, &s2)] {
                    for split in ["train", "valid", "test"] {
                        let part: Vec<&StageRow> =
                            rows.iter().filter(|r| r.split == split).collect();
                        if part.is_empty() {
                            continue;
                        }
                        let batch = stage_batch(&part, ds)?;
                        let counts = if ds == Dataset::Stage1 {
                            &mut stats.stage1
                        } else {
                            &mut stats.stage2
                        };
                        *counts.entry(split.to_string()).or_default() += part.len() as u64;
                        let ls = if ds == Dataset::Stage1 {
                            &mut stats.stage1_tokens
                        } else {
                            &mut stats.stage2_tokens
                        };
                        for r in &part {
                            if let Some(t) = &r.tokens {
                                ls.add(t.ids.len(), t.truncated);
                            }
                        }
                        writers
                            .get_mut(&(ds, split))
                            .context("writer")?
                            .write(&batch)?;
                    }
                }
                if !rejects.is_empty() {
                    rejects_w.write(&rejects_batch(&spec.name, &rejects)?)?;
                }
                stats.rejected += rejects.len() as u64;
                bar.set_position(done_bytes + counter.load(Ordering::Relaxed));
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "{} rows, {:.0} rows/s",
                    stats.rows_read + st.rows_read,
                    (stats.rows_read + st.rows_read) as f64 / secs
                ));
                Ok(())
            };
            read_file(spec, file, opts.chunk_rows, counter.clone(), &mut sink)?;
            done_bytes += std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        }
        stats.rows_read += st.rows_read;
        stats.pairs_written += st.pairs_written;
        stats.sources.insert(spec.name.clone(), st);
    }
    bar.finish_and_clear();
    for w in writers.values_mut() {
        w.close()?;
    }
    rejects_w.close()?;
    // Losslessness, checked by the tool itself.
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
    ok &= rejected_total == stats.rejected;
    stats.lossless = ok;
    stats.stage1_tokens.finish();
    stats.stage2_tokens.finish();
    stats.seconds = t0.elapsed().as_secs_f64();
    if !ok {
        bail!(
            "internal error: rows in != rows written + rows rejected (see above); nothing was written"
        );
    }
    let manifest = serde_json::json!({
        "builder": format!("gram-data {}", env!("CARGO_PKG_VERSION")),
        "schemas": {"stage1": Dataset::Stage1.tag(), "stage2": Dataset::Stage2.tag(), "rejects": Dataset::Rejects.tag()},
        "options": opts,
        "tokenizer": tok.map(|t| t.fingerprint()),
        "label_ids": tokenizer.map(|t| t.labels),
        "max_tokens": opts.max_tokens,
    });
    gram_core::atomic_write(
        &tmp.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    gram_core::atomic_write(
        &tmp.join("stats.json"),
        serde_json::to_string_pretty(&stats)?.as_bytes(),
    )?;
    Ok(stats)
}

/// One shard of [`Seen`]: (hash of prompt and responses) -> (file index, row).
type SeenShard = HashMap<(u64, u64), (u32, u32), BuildKeyHasher>;

/// Pairs seen so far, by a 128-bit hash of the normalised prompt and responses, with where each
/// was first seen. What grows with the input is this table, so it is kept small: 24 bytes per
/// pair (the hash as two u64, a file index and a row) plus one control byte per slot, in 64
/// shards by the hash's top bits. A single table doubles all at once, holding old and new slots
/// together (at 7.3M pairs of 32-byte entries that transient was ~830 MB); shards double one at a
/// time, so the transient is 1/64 of that. File names are stored once.
struct Seen {
    shards: Vec<SeenShard>,
    files: Vec<String>,
    file_ids: HashMap<String, u32>,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            shards: (0..SEEN_SHARDS).map(|_| HashMap::default()).collect(),
            files: Vec::new(),
            file_ids: HashMap::new(),
        }
    }
}

const SEEN_SHARDS: usize = 64;

/// The dedup keys are already uniform hashes: the table hashes them by xor instead of SipHash.
#[derive(Default, Clone, Copy)]
struct BuildKeyHasher;

impl std::hash::BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = self.0.rotate_left(29) ^ x;
    }
}

impl Seen {
    /// Records the pair; if it was seen before, says where.
    fn first_seen(&mut self, key: u128, file: &str, row: u64) -> Option<String> {
        let k = ((key >> 64) as u64, key as u64);
        let shard = &mut self.shards[(k.0 >> 58) as usize % SEEN_SHARDS];
        if let Some(&(f, r)) = shard.get(&k) {
            let at = if r == u32::MAX {
                "beyond row 4294967294".to_string()
            } else {
                format!("row {r}")
            };
            return Some(format!("at {} {at}", self.files[f as usize]));
        }
        let f = match self.file_ids.get(file) {
            Some(&f) => f,
            None => {
                let f = self.files.len() as u32;
                self.files.push(file.to_string());
                self.file_ids.insert(file.to_string(), f);
                f
            }
        };
        shard.insert(k, (f, u32::try_from(row).unwrap_or(u32::MAX)));
        None
    }
}

fn check_pair(
    m: MappedPair,
    idx: u32,
    spec: &Spec,
    opts: &BuildOptions,
    seen: &mut Seen,
) -> std::result::Result<Pair, Reject> {
    let rej = |reason: String, m: &MappedPair| {
        Reject {
        file: m.file.clone(),
        row: m.row,
        reason,
        raw: Some(serde_json::json!({"prompt": m.prompt, "response_a": m.response_a, "response_b": m.response_b, "label": m.label}).to_string()),
    }
    };
    if let Some(r) = &m.reject {
        return Err(rej(r.clone(), &m));
    }
    let (Some(prompt), Some(a), Some(b)) = (&m.prompt, &m.response_a, &m.response_b) else {
        let which = if m.prompt.is_none() {
            "prompt"
        } else if m.response_a.is_none() {
            "response_a"
        } else {
            "response_b"
        };
        return Err(rej(format!("{which} is missing"), &m));
    };
    let label = match m.label.as_deref().map(str::trim) {
        None => None,
        Some("a" | "A") => Some("a"),
        Some("b" | "B") => Some("b"),
        Some("tie" | "TIE" | "Tie") => Some("tie"),
        Some(other) => return Err(rej(format!("label `{other}` is not one of a, b, tie"), &m)),
    };
    let (na, nb) = (norm(a), norm(b));
    if norm(prompt).is_empty() {
        return Err(rej("prompt is empty".into(), &m));
    }
    if na.is_empty() || nb.is_empty() {
        return Err(rej(
            format!(
                "{} is empty",
                if na.is_empty() {
                    "response_a"
                } else {
                    "response_b"
                }
            ),
            &m,
        ));
    }
    if na == nb {
        return Err(rej("responses are identical".into(), &m));
    }
    let id = m.id.clone().unwrap_or_else(|| {
        // The file as seen from the spec's folder: stable across machines, distinct for files of
        // the same name in different folders (LLMBar's subsets are all `dataset.json`).
        let base = spec.path.parent().unwrap_or(Path::new("."));
        let file = Path::new(&m.file)
            .strip_prefix(base)
            .unwrap_or(Path::new(&m.file))
            .to_string_lossy()
            .into_owned();
        format!(
            "{:016x}",
            hash64(&[
                spec.name.as_bytes(),
                file.as_bytes(),
                &m.row.to_le_bytes(),
                &idx.to_le_bytes()
            ])
        )
    });
    let (lo, hi) = if na <= nb { (&na, &nb) } else { (&nb, &na) };
    let key = blake3::hash([norm(prompt).as_str(), lo, hi].join("\u{0}").as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&key.as_bytes()[..16]);
    if let Some(first) = seen.first_seen(u128::from_le_bytes(k), &m.file, m.row) {
        return Err(rej(format!("duplicate of pair {first}"), &m));
    }
    Ok(Pair {
        file: m.file.clone(),
        row: m.row,
        id,
        source: spec.name.clone(),
        split: split_of(prompt, opts.valid_frac, opts.test_frac),
        prompt: prompt.clone(),
        a: a.clone(),
        b: b.clone(),
        label,
        metadata: m.metadata.clone(),
    })
}

/// Stage-1 row (every pair, labels dropped, one seeded order) and stage-2 rows (labeled pairs,
/// both orders by default).
fn stage_rows(
    p: &Pair,
    opts: &BuildOptions,
    tz: Option<&Tokenizer<'_>>,
) -> Result<(Vec<StageRow>, Vec<StageRow>)> {
    let swap = hash64(&[&opts.seed.to_le_bytes(), p.id.as_bytes()]) & 1 == 1;
    let order = |swapped: bool| {
        if swapped {
            (p.b.clone(), p.a.clone())
        } else {
            (p.a.clone(), p.b.clone())
        }
    };
    let check_len = |t: &Tokens| -> Result<()> {
        if let Some(limit) = opts.drop_over
            && t.full_len > limit
        {
            bail!(
                "{} tokens before truncation > --drop-over {limit}",
                t.full_len
            );
        }
        Ok(())
    };
    let (a1, b1) = order(swap);
    let t1 = match tz {
        Some(t) => {
            let x = t.stage1(&p.prompt, &a1, &b1)?;
            check_len(&x)?;
            Some(x)
        }
        None => None,
    };
    let s1 = vec![StageRow {
        id: format!("{}-s1", p.id),
        pair_id: p.id.clone(),
        source: p.source.clone(),
        split: p.split,
        prompt: p.prompt.clone(),
        a: a1,
        b: b1,
        label: None,
        swapped: swap,
        tokens: t1,
        label_token: None,
        metadata: None,
    }];
    let mut s2 = Vec::new();
    if let Some(l) = p.label.filter(|l| *l != "tie") {
        let orders: Vec<bool> = if opts.both_orders {
            vec![false, true]
        } else {
            vec![swap]
        };
        for swapped in orders {
            let (a, b) = order(swapped);
            // After a swap the preferred response sits in the other slot.
            let label = match (l, swapped) {
                ("a", false) | ("b", true) => "a",
                _ => "b",
            };
            let (tokens, label_token) = match tz {
                Some(t) => {
                    let x = t.stage2(&p.prompt, &a, &b)?;
                    check_len(&x)?;
                    (
                        Some(x),
                        Some(if label == "a" { t.labels.a } else { t.labels.b }),
                    )
                }
                None => (None, None),
            };
            s2.push(StageRow {
                id: format!("{}-s2{}", p.id, if swapped { "ba" } else { "ab" }),
                pair_id: p.id.clone(),
                source: p.source.clone(),
                split: p.split,
                prompt: p.prompt.clone(),
                a,
                b,
                label: Some(label),
                swapped,
                tokens,
                label_token,
                metadata: p.metadata.clone(),
            });
        }
    }
    Ok((s1, s2))
}

/// Prints the stats as a table on stderr.
pub fn print_stats(s: &Stats, out: &Path) {
    eprintln!(
        "\n{:<28} {:>9} {:>9} {:>9} {:>9}  splits (train/valid/test)",
        "source", "rows", "pairs", "written", "rejected"
    );
    for (name, x) in &s.sources {
        let sp = |k: &str| x.splits.get(k).copied().unwrap_or(0);
        eprintln!(
            "{:<28} {:>9} {:>9} {:>9} {:>9}  {}/{}/{}",
            name,
            x.rows_read,
            x.pairs,
            x.pairs_written,
            x.rows_rejected + x.pairs_rejected,
            sp("train"),
            sp("valid"),
            sp("test")
        );
        for (r, n) in &x.reject_reasons {
            eprintln!("    rejected {n:>7}  {r}");
        }
    }
    let sp = |m: &BTreeMap<String, u64>| {
        format!(
            "{}/{}/{}",
            m.get("train").unwrap_or(&0),
            m.get("valid").unwrap_or(&0),
            m.get("test").unwrap_or(&0)
        )
    };
    eprintln!("stage 1 rows (train/valid/test): {}", sp(&s.stage1));
    eprintln!("stage 2 rows (train/valid/test): {}", sp(&s.stage2));
    for (n, l) in [("stage 1", &s.stage1_tokens), ("stage 2", &s.stage2_tokens)] {
        if l.count > 0 {
            eprintln!(
                "{n} tokens: p50 {} p90 {} p99 {} max {} ({} truncated)",
                l.p50, l.p90, l.p99, l.max, l.truncated
            );
        }
    }
    let rows_rejected: u64 = s.sources.values().map(|x| x.rows_rejected).sum();
    let pairs: u64 = s.sources.values().map(|x| x.pairs).sum();
    eprintln!(
        "rows in {} = {} mapped to pairs + {} rejected; pairs {} = {} written + {} rejected (lossless: {}); {:.1} s -> {}",
        s.rows_read,
        s.rows_read - rows_rejected,
        rows_rejected,
        pairs,
        s.pairs_written,
        s.rejected - rows_rejected,
        s.lossless,
        s.seconds,
        out.display()
    );
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn seen_reports_where_a_duplicate_was_first_seen() {
        let mut seen = Seen::default();
        // Uniform keys, as the blake3-derived ones are.
        let key = |i: u64| {
            (u128::from(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) << 64)
                | u128::from(i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        };
        for i in 0..10_000u64 {
            assert_eq!(seen.first_seen(key(i), "a.jsonl", i), None, "new pair {i}");
        }
        // Keys equal in one half only are different pairs.
        assert_eq!(seen.first_seen(key(7) ^ 1, "b.jsonl", 0), None);
        assert_eq!(seen.first_seen(key(7) ^ (1 << 100), "b.jsonl", 1), None);
        assert_eq!(
            seen.first_seen(key(7), "b.jsonl", 2).as_deref(),
            Some("at a.jsonl row 7")
        );
        assert_eq!(
            seen.first_seen(key(7) ^ 1, "c.jsonl", 5).as_deref(),
            Some("at b.jsonl row 0")
        );
        // A row past u32 is kept as "beyond", never wrapped.
        assert_eq!(seen.first_seen(42 << 66, "big.jsonl", 1 << 33), None);
        assert_eq!(
            seen.first_seen(42 << 66, "x", 0).as_deref(),
            Some("at big.jsonl beyond row 4294967294")
        );
        let n: usize = seen.shards.iter().map(std::collections::HashMap::len).sum();
        assert_eq!(n, 10_003);
        assert!(
            seen.shards.iter().all(|s| !s.is_empty()),
            "keys spread over all shards"
        );
    }
}
