//! The output folder's Parquet writers: stage-1 and stage-2 shards per split, rolled over every
//! `--shard-rows` rows, and the rejects table, all tagged with their schema and the build's
//! metadata.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use gram_core::schema::Dataset;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, OrInternal, Result};

/// The splits every stage is written in.
pub(crate) const SPLITS: [&str; 3] = ["train", "valid", "test"];

/// Every writer of one build's (temporary) output folder.
pub(crate) struct Outputs {
    stages: HashMap<(Dataset, &'static str), Shards>,
    rejects: Shards,
}

impl Outputs {
    /// Writers under `dir` (`stage1/`, `stage2/` and the rejects table), with `meta` as each
    /// file's key-value metadata.
    pub(crate) fn new(dir: &Path, shard_rows: usize, meta: &[(String, String)]) -> Result<Self> {
        let mut stages = HashMap::new();
        for (ds, sub) in [(Dataset::Stage1, "stage1"), (Dataset::Stage2, "stage2")] {
            let sub = dir.join(sub);
            std::fs::create_dir_all(&sub).map_err(|e| Error::output(&sub, e))?;
            for split in SPLITS {
                let w = Shards::new(sub.clone(), split, ds, shard_rows, meta);
                stages.insert((ds, split), w);
            }
        }
        let rejects = Shards::new(
            dir.to_path_buf(),
            "rejects",
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

    /// Closes every file (writing its footer).
    pub(crate) fn close(mut self) -> Result<()> {
        for w in self.stages.values_mut() {
            w.close()?;
        }
        self.rejects.close()
    }
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
        }
    }

    /// The file of the shard being written (the last one opened).
    fn path(&self) -> PathBuf {
        let index = self.index.saturating_sub(1);
        self.dir.join(format!("{}-{index:05}.parquet", self.prefix))
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut start = 0;
        while start < batch.num_rows() {
            if self.writer.is_none() {
                self.index += 1;
                self.rows_in_shard = 0;
                let p = self.path();
                let f = File::create(&p).map_err(|e| Error::output(&p, e))?;
                let w = ArrowWriter::try_new(f, self.schema.clone(), Some(self.props.clone()))
                    .map_err(|e| Error::output(&p, e))?;
                self.writer = Some(w);
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
            w.close().map_err(|e| Error::output(self.path(), e))?;
        }
        Ok(())
    }
}
