//! A build's tokenisation and writing as one DataFusion plan, for `--cluster`: the checked pairs
//! are staged as Parquet in the build's folder ([`Staged`]), a query over them calls
//! `gram_tokens` for every example ([`sql`]) wherever the session runs it (this process, or a
//! Ballista cluster whose executors read the staged files and the model from the same paths),
//! each result row becomes the pair's stage rows ([`rows_of`]) exactly as a build without
//! `--cluster` makes them (one [`crate::stage::assemble`] for both), and the plan's tasks write
//! them ([`crate::sink`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, StructArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type, UInt64Type};
use gram_core::fit::Tokens;
use parquet::arrow::ArrowWriter;

use datafusion::prelude::{DataFrame, ParquetReadOptions};

use crate::build::BuildOptions;
use crate::cluster::Target;
use crate::error::{Error, OrInternal, Result};
use crate::pairs::Pair;
use crate::shards::Rejected;
use crate::sink::{ShardSink, SinkSpec};
use crate::stage::{Example, StageRow, assemble, swapped};

/// The staged pairs' table in the plan's session.
pub(crate) const TABLE: &str = "gram_pairs";

/// The checked pairs of a build, written as Parquet files (one per input chunk) under `dir`.
pub(crate) struct Staged {
    pub(crate) dir: PathBuf,
    files: usize,
    /// Pairs staged.
    pub(crate) pairs: u64,
    schema: SchemaRef,
}

impl Staged {
    pub(crate) fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::output(&dir, e))?;
        let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
        let schema = Arc::new(Schema::new(vec![
            s("source", false),
            s("file", false),
            Field::new("row", DataType::UInt64, false),
            s("id", false),
            s("prompt", false),
            s("response_a", false),
            s("response_b", false),
            s("label", true),
            s("metadata", true),
            Field::new("swap", DataType::Boolean, false),
            s("raw_label", true),
            // Dedup: the pair's key, and its place in the input (the first of equal keys stays).
            s("dedup_key", false),
            Field::new("seq", DataType::UInt64, false),
        ]));
        Ok(Self {
            dir,
            files: 0,
            pairs: 0,
            schema,
        })
    }

    /// Stages one chunk's checked pairs.
    pub(crate) fn write(&mut self, pairs: &[Pair], opts: &BuildOptions) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let strings = |f: &dyn Fn(&Pair) -> Option<&str>| -> ArrayRef {
            Arc::new(pairs.iter().map(f).collect::<StringArray>())
        };
        let cols: Vec<ArrayRef> = vec![
            strings(&|p| Some(&p.source)),
            strings(&|p| Some(&p.file)),
            Arc::new(pairs.iter().map(|p| p.row).collect::<UInt64Array>()),
            strings(&|p| Some(&p.id)),
            strings(&|p| Some(&p.prompt)),
            strings(&|p| Some(&p.a)),
            strings(&|p| Some(&p.b)),
            strings(&|p| p.label),
            strings(&|p| p.metadata.as_deref()),
            Arc::new(
                pairs
                    .iter()
                    .map(|p| Some(swapped(p, opts)))
                    .collect::<BooleanArray>(),
            ),
            strings(&|p| p.raw_label.as_deref()),
            Arc::new(
                pairs
                    .iter()
                    .map(|p| Some(format!("{:032x}", p.key)))
                    .collect::<StringArray>(),
            ),
            Arc::new((self.pairs..).take(pairs.len()).collect::<UInt64Array>()),
        ];
        let batch = RecordBatch::try_new(self.schema.clone(), cols).or_internal("staged pairs")?;
        let path = self.dir.join(format!("pairs-{:05}.parquet", self.files));
        let file = std::fs::File::create(&path).map_err(|e| Error::output(&path, e))?;
        let props = gram_core::parquet_props().build();
        let mut w = ArrowWriter::try_new(file, self.schema.clone(), Some(props))
            .map_err(|e| Error::output(&path, e))?;
        w.write(&batch).map_err(|e| Error::output(&path, e))?;
        w.close().map_err(|e| Error::output(&path, e))?;
        self.files += 1;
        self.pairs += pairs.len() as u64;
        Ok(())
    }
}

/// The query that deduplicates, splits and tokenises the staged pairs with the model at
/// `model` (an absolute path the executors can read; none: text only): the pair's columns; its
/// split by `gram_split` (as the build's checks computed it); for a duplicate (a pair whose key
/// an earlier pair of the input has), where that first one is (`dup_file`, `dup_row`); and, per
/// example of the others, `gram_tokens`'s struct (`t1`: stage 1 in the pair's seeded order;
/// `t_ab`, `t_ba`: stage 2 as given and exchanged, for labeled pairs in the orders the build
/// presents).
pub(crate) fn sql(opts: &BuildOptions, model: Option<&Path>) -> Result<String> {
    let split = format!(
        "gram_split(prompt, CAST({:?} AS DOUBLE), CAST({:?} AS DOUBLE)) AS split",
        opts.valid_frac, opts.test_frac
    );
    let first = "OVER (PARTITION BY dedup_key ORDER BY seq)";
    let ranked = format!(
        "(SELECT *, row_number() {first} AS gram_rank, first_value(file) {first} AS first_file, \
         first_value(row) {first} AS first_row FROM {TABLE})"
    );
    let base = format!(
        "source, file, row, id, {split}, prompt, response_a, response_b, label, metadata, \
         raw_label, CASE WHEN gram_rank > 1 THEN first_file END AS dup_file, \
         CASE WHEN gram_rank > 1 THEN first_row END AS dup_row"
    );
    let Some(model) = model else {
        return Ok(format!("SELECT {base} FROM {ranked}"));
    };
    let model = model
        .to_str()
        .ok_or_else(|| Error::Options(format!("{}: not a UTF-8 path", model.display())))?;
    let chat = match opts.chat {
        None => "auto",
        Some(true) => "chat",
        Some(false) => "raw",
    };
    let quoted = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let tokens = |stage: &str, a: &str, b: &str| {
        format!(
            "gram_tokens('{stage}', {}, '{chat}', {}, prompt, {a}, {b})",
            quoted(model),
            opts.max_tokens
        )
    };
    let t1 = tokens(
        "stage1",
        "CASE WHEN swap THEN response_b ELSE response_a END",
        "CASE WHEN swap THEN response_a ELSE response_b END",
    );
    let (ab, ba) = if opts.both_orders {
        ("TRUE", "TRUE")
    } else {
        ("NOT swap", "swap")
    };
    let labeled = "gram_rank = 1 AND label IN ('a', 'b')";
    Ok(format!(
        "SELECT {base}, CASE WHEN gram_rank = 1 THEN {t1} END AS t1, \
         CASE WHEN {labeled} AND {ab} THEN {} END AS t_ab, \
         CASE WHEN {labeled} AND {ba} THEN {} END AS t_ba \
         FROM {ranked}",
        tokens("stage2", "response_a", "response_b"),
        tokens("stage2", "response_b", "response_a"),
    ))
}

/// A string column of a result batch (Parquet's strings come back as views).
fn text(b: &RecordBatch, name: &str) -> Result<StringArray> {
    let c = b
        .column_by_name(name)
        .or_internal(&format!("the plan's result has no `{name}`"))?;
    let c = arrow::compute::cast(c, &DataType::Utf8).or_internal(name)?;
    Ok(c.as_string::<i32>().clone())
}

/// Row `i` of a `gram_tokens` struct column: None where the plan made no example.
fn tokens_at(c: &StructArray, i: usize) -> Option<std::result::Result<Tokens, String>> {
    if c.is_null(i) {
        return None;
    }
    let error = c.column(5).as_string::<i32>();
    if !error.is_null(i) {
        return Some(Err(error.value(i).to_string()));
    }
    let u32_at = |k: usize| c.column(k).as_primitive::<UInt32Type>().value(i) as usize;
    let ids = c.column(0).as_list::<i32>().value(i);
    Some(Ok(Tokens {
        ids: ids.as_primitive::<UInt32Type>().values().to_vec(),
        prompt_len: u32_at(1),
        truncated: c.column(3).as_boolean().value(i),
        full_len: u32_at(4),
    }))
}

/// A pair with its stage rows, or why it is not written.
pub(crate) type Made = (
    Pair,
    std::result::Result<(Vec<StageRow>, Vec<StageRow>), crate::shards::Rejected>,
);

/// The pair columns of a result batch (the staged table's, as text), and where a duplicate's
/// first pair is.
struct PairColumns {
    text: [StringArray; 10],
    row: UInt64Array,
    dup: (StringArray, UInt64Array),
}

impl PairColumns {
    const NAMES: [&str; 10] = [
        "source",
        "file",
        "id",
        "split",
        "prompt",
        "response_a",
        "response_b",
        "label",
        "metadata",
        "raw_label",
    ];

    fn new(b: &RecordBatch) -> Result<Self> {
        let mut text = Vec::with_capacity(Self::NAMES.len());
        for n in Self::NAMES {
            text.push(self::text(b, n)?);
        }
        let u64s = |name: &str| -> Result<UInt64Array> {
            let c = b.column_by_name(name).or_internal(name)?;
            let c = arrow::compute::cast(c, &DataType::UInt64).or_internal(name)?;
            Ok(c.as_primitive::<UInt64Type>().clone())
        };
        Ok(Self {
            text: text.try_into().ok().or_internal("pair columns")?,
            row: u64s("row")?,
            dup: (self::text(b, "dup_file")?, u64s("dup_row")?),
        })
    }

    /// Where the first pair is, if row `i` is a duplicate of it.
    fn first_of(&self, i: usize) -> Option<String> {
        let (file, row) = &self.dup;
        file.is_valid(i)
            .then(|| crate::dedup::seen_at(file.value(i), row.value(i)))
    }

    /// Row `i` as the checked pair it was staged from.
    fn pair(&self, i: usize) -> Result<Pair> {
        let [
            source,
            file,
            id,
            split,
            prompt,
            a,
            b,
            label,
            meta,
            raw_label,
        ] = &self.text;
        let s = |c: &StringArray| c.value(i).to_string();
        Ok(Pair {
            file: s(file),
            row: self.row.value(i),
            id: s(id),
            source: s(source),
            split: static_split(split.value(i))?,
            prompt: s(prompt),
            a: s(a),
            b: s(b),
            label: static_label(label.is_valid(i).then(|| label.value(i)))?,
            metadata: meta.is_valid(i).then(|| s(meta)),
            raw_label: raw_label.is_valid(i).then(|| s(raw_label)),
            // The plan found the duplicates; the key is not needed past it.
            key: 0,
        })
    }
}

/// The pairs of one result batch with their stage rows, assembled from the plan's token columns
/// (`labels`: the ids of `A` and `B`, when a model is given).
pub(crate) fn rows_of(
    b: &RecordBatch,
    opts: &BuildOptions,
    labels: Option<(u32, u32)>,
) -> Result<Vec<Made>> {
    let pairs = PairColumns::new(b)?;
    let t = |n: &str| b.column_by_name(n).map(|c| c.as_struct().clone());
    let (t1, tab, tba) = (t("t1"), t("t_ab"), t("t_ba"));
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let p = pairs.pair(i)?;
        if let Some(first) = pairs.first_of(i) {
            let reject = p.duplicate(&first);
            out.push((p, Err(Rejected::Row(reject))));
            continue;
        }
        let mut missing = None;
        let made = assemble(&p, opts, labels, |example, _, _| {
            let column = match example {
                Example::Stage1 => &t1,
                Example::Stage2 { swapped: false } => &tab,
                Example::Stage2 { swapped: true } => &tba,
            };
            match column.as_ref().map(|c| tokens_at(c, i)) {
                None => Ok(None),
                Some(Some(r)) => r.map(Some),
                Some(None) => {
                    missing = Some(example);
                    Err(String::new())
                }
            }
        });
        if let Some(example) = missing {
            return Err(Error::internal(format!(
                "the plan made no {example:?} example for pair {}",
                p.id
            )));
        }
        out.push((p, made.map_err(Rejected::Pair)));
    }
    Ok(out)
}

fn static_split(s: &str) -> Result<&'static str> {
    crate::shards::SPLITS
        .into_iter()
        .find(|x| *x == s)
        .ok_or_else(|| Error::internal(format!("a staged pair with split `{s}`")))
}

fn static_label(s: Option<&str>) -> Result<Option<&'static str>> {
    match s {
        None => Ok(None),
        Some("a") => Ok(Some("a")),
        Some("b") => Ok(Some("b")),
        Some("tie") => Ok(Some("tie")),
        Some(other) => Err(Error::internal(format!("a staged pair labeled `{other}`"))),
    }
}

/// Fails early, before any data is read, when `target` is a scheduler nothing answers at.
pub(crate) fn check_reachable(target: &Target) -> Result<()> {
    target.check_reachable().map_err(|msg| Error::Cluster {
        target: target.to_string(),
        msg,
    })
}

/// Runs `sql` over the staged pairs in `dir` on `target`, with its rows written as the build's
/// shards where the plan's tasks run ([`crate::sink`]) in `partitions` partitions (None: the
/// session's default); what each partition wrote.
pub(crate) fn run(
    target: &Target,
    dir: &Path,
    sql: &str,
    spec: &SinkSpec,
    partitions: Option<usize>,
) -> Result<Vec<crate::sink::Part>> {
    use datafusion::logical_expr::{Extension, LogicalPlan};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .or_internal("starting tokio")?;
    let fail = |e: datafusion::error::DataFusionError| Error::Cluster {
        target: target.to_string(),
        msg: gram_session::one_line(&e),
    };
    // Absolute: executors resolve a relative path against their own working folder.
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::output(dir, e))?;
    let dir = dir
        .to_str()
        .ok_or_else(|| Error::output(&dir, "not a UTF-8 path"))?;
    rt.block_on(async {
        let ctx = crate::cluster::connect(target, partitions)
            .await
            .map_err(fail)?;
        ctx.register_parquet(TABLE, dir, ParquetReadOptions::default())
            .await
            .map_err(fail)?;
        let query = ctx.sql(sql).await.map_err(fail)?;
        let sink = ShardSink::new(query.logical_plan().clone(), spec).map_err(fail)?;
        let plan = LogicalPlan::Extension(Extension {
            node: Arc::new(sink),
        });
        let written = DataFrame::new(ctx.state(), plan)
            .collect()
            .await
            .map_err(fail)?;
        let mut parts = Vec::new();
        for b in &written {
            parts.extend(crate::sink::parts(b)?);
        }
        Ok(parts)
    })
}
