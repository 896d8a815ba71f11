//! The output folder's Parquet writers: stage-1 and stage-2 shards per split, rolled over every
//! `--shard-rows` rows, and the rejects table, all tagged with their schema and the build's
//! metadata; and the [`Writer`] that sorts stage rows and rejects into them and counts them.
//! Every file is written under a temporary name and renamed when complete, so a file with a
//! shard's name is a whole shard, whoever wrote it (the build, or a task of its plan that a
//! cluster may run more than once).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use gram_core::schema::Dataset;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, OrInternal, Result};
use crate::plan::Made;
use crate::read::Reject;
use crate::stage::{StageRow, rejects_batch, stage_batch};
use crate::stats::{SourceStats, Stats, reason_key};

/// The splits every stage is written in.
pub(crate) const SPLITS: [&str; 3] = ["train", "valid", "test"];

/// Every writer of one build's (temporary) output folder.
pub(crate) struct Outputs {
    stages: HashMap<(Dataset, &'static str), Shards>,
    rejects: Shards,
}

impl Outputs {
    /// Writers under `dir` (`stage1/`, `stage2/` and the rejects table), with `meta` as each
    /// file's key-value metadata; `tag` goes into each file's name after its split (`-pNNNNN`
    /// for one partition of a plan, empty for the build itself).
    pub(crate) fn new(
        dir: &Path,
        shard_rows: usize,
        meta: &[(String, String)],
        tag: &str,
    ) -> Result<Self> {
        let mut stages = HashMap::new();
        for (ds, sub) in [(Dataset::Stage1, "stage1"), (Dataset::Stage2, "stage2")] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| Error::output(&path, e))?;
            for split in SPLITS {
                let name = format!("{sub}/{split}{tag}");
                let w = Shards::new(dir.to_path_buf(), &name, ds, shard_rows, meta);
                stages.insert((ds, split), w);
            }
        }
        let rejects = Shards::new(
            dir.to_path_buf(),
            &format!("rejects{tag}"),
            Dataset::Rejects,
            usize::MAX,
            meta,
        );
        Ok(Self { stages, rejects })
    }

    /// Appends rows of `split` to a stage dataset.
    pub(crate) fn write_stage(
        &mut self,
        dataset: Dataset,
        split: &'static str,
        batch: &RecordBatch,
    ) -> Result<()> {
        self.stages
            .get_mut(&(dataset, split))
            .or_internal("no writer for this dataset and split")?
            .write(batch)
    }

    /// Appends rows to the rejects table.
    pub(crate) fn write_rejects(&mut self, batch: &RecordBatch) -> Result<()> {
        self.rejects.write(batch)
    }

    /// Closes every file (writing its footer); the files written, as sorted `/`-separated
    /// paths relative to the folder.
    pub(crate) fn close(mut self) -> Result<Vec<String>> {
        let mut files = Vec::new();
        for w in self.stages.values_mut().chain([&mut self.rejects]) {
            w.close()?;
            files.append(&mut w.done);
        }
        files.sort();
        Ok(files)
    }
}

/// A Parquet writer that rolls over every `rows` rows.
struct Shards {
    dir: PathBuf,
    /// Each file's path under `dir` up to its number (`stage1/train-p...`).
    prefix: String,
    rows_per_shard: usize,
    schema: arrow::datatypes::SchemaRef,
    props: WriterProperties,
    index: usize,
    rows_in_shard: usize,
    writer: Option<ArrowWriter<File>>,
    /// The file the open shard is written to.
    partial: PathBuf,
    /// The files completed, relative to `dir`.
    done: Vec<String>,
}

/// Where a shard is written before it is complete: unique to this process and moment, so two
/// runs of one plan task never write into one file.
fn partial_path(path: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}-{nanos}{PARTIAL}", std::process::id()));
    path.with_file_name(name)
}

/// The suffix of a shard still being written.
const PARTIAL: &str = ".partial";

/// The data files among `present` (paths relative to an output) that no writer of the build
/// reported writing: what a task left that was killed mid-shard, or that ran again elsewhere
/// (its executor lost) under other names. A dataset holds only the files its writers report.
pub(crate) fn strays(present: &[String], keep: &HashSet<String>) -> Vec<String> {
    let data = |f: &str| {
        let under = f.starts_with("stage1/")
            || f.starts_with("stage2/")
            || (f.starts_with("rejects") && !f.contains('/'));
        under && (f.ends_with(".parquet") || f.ends_with(PARTIAL))
    };
    present
        .iter()
        .filter(|f| data(f) && !keep.contains(*f))
        .cloned()
        .collect()
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
        let props = gram_core::parquet_props()
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
            partial: PathBuf::new(),
            done: Vec::new(),
        }
    }

    /// The file of the shard being written (the last one opened), relative to `dir`.
    fn rel(&self) -> String {
        let index = self.index.saturating_sub(1);
        format!("{}-{index:05}.parquet", self.prefix)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(self.rel())
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut start = 0;
        while start < batch.num_rows() {
            if self.writer.is_none() {
                self.index += 1;
                self.rows_in_shard = 0;
                let p = self.path();
                let partial = partial_path(&p);
                let f = File::create(&partial).map_err(|e| Error::output(&p, e))?;
                let w = ArrowWriter::try_new(f, self.schema.clone(), Some(self.props.clone()))
                    .map_err(|e| Error::output(&p, e))?;
                self.writer = Some(w);
                self.partial = partial;
            }
            let take = (self.rows_per_shard - self.rows_in_shard).min(batch.num_rows() - start);
            if let Some(w) = self.writer.as_mut() {
                w.write(&batch.slice(start, take))
                    .map_err(|e| Error::output(self.path(), e))?;
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
            let path = self.path();
            w.close().map_err(|e| Error::output(&path, e))?;
            std::fs::rename(&self.partial, &path).map_err(|e| Error::output(&path, e))?;
            self.done.push(self.rel());
        }
        Ok(())
    }
}

/// Sorts a build's stage rows and rejects into [`Outputs`] and counts them into [`Stats`]:
/// the build's own writer, and each partition's in a plan whose tasks write the shards.
pub(crate) struct Writer {
    out: Outputs,
    pub(crate) stats: Stats,
}

impl Writer {
    pub(crate) fn new(out: Outputs) -> Self {
        Self {
            out,
            stats: Stats::default(),
        }
    }

    /// Writes stage rows and a source's rejects, and counts the rejects' reasons into `st`.
    pub(crate) fn write_rows(
        &mut self,
        source: &str,
        st: &mut SourceStats,
        s1: &[StageRow],
        s2: &[StageRow],
        rejects: &[Reject],
    ) -> Result<()> {
        for r in rejects {
            *st.reject_reasons.entry(reason_key(&r.reason)).or_default() += 1;
        }
        self.write_stage(Dataset::Stage1, s1)?;
        self.write_stage(Dataset::Stage2, s2)?;
        if !rejects.is_empty() {
            self.out.write_rejects(&rejects_batch(source, rejects)?)?;
        }
        self.stats.rejected += rejects.len() as u64;
        Ok(())
    }

    /// Writes stage rows by split and counts them.
    fn write_stage(&mut self, dataset: Dataset, rows: &[StageRow]) -> Result<()> {
        for split in SPLITS {
            let part: Vec<&StageRow> = rows.iter().filter(|r| r.split == split).collect();
            if part.is_empty() {
                continue;
            }
            let (counts, lengths) = match dataset {
                Dataset::Stage1 => (&mut self.stats.stage1, &mut self.stats.stage1_tokens),
                _ => (&mut self.stats.stage2, &mut self.stats.stage2_tokens),
            };
            *counts.entry(split.to_string()).or_default() += part.len() as u64;
            for t in part.iter().filter_map(|r| r.tokens.as_ref()) {
                lengths.add(t.ids.len(), t.truncated);
            }
            self.out
                .write_stage(dataset, split, &stage_batch(&part, dataset)?)?;
        }
        Ok(())
    }

    /// What a partition of the build's plan made: counted into their sources and written.
    pub(crate) fn items(&mut self, items: Vec<Item>) -> Result<()> {
        let mut by_source: BTreeMap<String, Vec<Item>> = BTreeMap::new();
        for it in items {
            by_source
                .entry(it.source().to_string())
                .or_default()
                .push(it);
        }
        for (source, items) in by_source {
            let mut st = self.stats.sources.remove(&source).unwrap_or_default();
            let (mut s1, mut s2, mut rejects) = (Vec::new(), Vec::new(), Vec::new());
            let written = st.pairs_written;
            for it in items {
                match it {
                    Item::Made(m) => {
                        let before = rejects.len();
                        tally(*m, &mut st, (&mut s1, &mut s2), &mut rejects);
                        st.pairs_rejected += (rejects.len() - before) as u64;
                    }
                    Item::Rejected { reject, row, .. } => {
                        match row {
                            true => st.rows_rejected += 1,
                            false => st.pairs_rejected += 1,
                        }
                        rejects.push(reject);
                    }
                    Item::Counts { rows, pairs, .. } => {
                        st.rows_read += rows;
                        st.pairs += pairs;
                        self.stats.rows_read += rows;
                    }
                }
            }
            self.stats.pairs_written += st.pairs_written - written;
            let result = self.write_rows(&source, &mut st, &s1, &s2, &rejects);
            self.stats.sources.insert(source, st);
            result?;
        }
        Ok(())
    }

    /// Closes every file; the counts of what was written, and the files (relative paths).
    pub(crate) fn close(self) -> Result<(Stats, Vec<String>)> {
        let files = self.out.close()?;
        Ok((self.stats, files))
    }
}

/// One row of a build's plan, as its writing task sees it.
pub(crate) enum Item {
    /// A checked pair, with its stage rows or why it is not written.
    Made(Box<Made>),
    /// An input row that became no pair (`row`), or a mapped pair that failed its checks.
    Rejected {
        source: String,
        reject: Reject,
        row: bool,
    },
    /// Input rows read and pairs mapped in one chunk of a source.
    Counts {
        source: String,
        rows: u64,
        pairs: u64,
    },
}

impl Item {
    fn source(&self) -> &str {
        match self {
            Self::Made(m) => &m.0.source,
            Self::Rejected { source, .. } | Self::Counts { source, .. } => source,
        }
    }
}

/// Why a checked pair was not written: a reason about the pair (its reject says `pair ID:
/// REASON`), or a reject made whole elsewhere (a duplicate's).
#[derive(Debug)]
pub(crate) enum Rejected {
    Pair(String),
    Row(Reject),
}

/// Counts a pair's outcome into its source's stats and sorts it into stage rows or a reject.
pub(crate) fn tally(
    (p, made): Made,
    st: &mut SourceStats,
    (s1, s2): (&mut Vec<StageRow>, &mut Vec<StageRow>),
    rejects: &mut Vec<Reject>,
) {
    match made {
        Ok((a, b)) => {
            st.pairs_written += 1;
            *st.splits.entry(p.split.to_string()).or_default() += 1;
            let label = p.label.unwrap_or("none").to_string();
            *st.labels.entry(label).or_default() += 1;
            s1.extend(a);
            s2.extend(b);
        }
        Err(Rejected::Pair(e)) => rejects.push(Reject {
            file: p.file,
            row: p.row,
            reason: format!("pair {}: {e}", p.id),
            raw: None,
        }),
        Err(Rejected::Row(r)) => rejects.push(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strays_are_the_unreported_data_files_only() {
        let present: Vec<String> = [
            ".pairs/pairs-00000.parquet",
            "manifest.json",
            "rejects-00000.parquet",
            "rejects-p00000000000000ab-00000.parquet",
            "stage1/train-p00000000000000ab-00000.parquet",
            "stage1/train-p00000000000000cd-00000.parquet",
            "stage2/test-p00000000000000cd-00001.parquet.12-34.partial",
            "stats.json",
        ]
        .map(String::from)
        .to_vec();
        let keep: HashSet<String> = [
            "rejects-00000.parquet",
            "stage1/train-p00000000000000ab-00000.parquet",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            strays(&present, &keep),
            [
                "rejects-p00000000000000ab-00000.parquet",
                "stage1/train-p00000000000000cd-00000.parquet",
                "stage2/test-p00000000000000cd-00001.parquet.12-34.partial",
            ]
        );
    }
}
