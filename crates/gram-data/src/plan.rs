//! A `--cluster` build as one DataFusion plan: its tasks read, map and check the input files
//! ([`crate::scan`]), a query over their rows deduplicates, splits and calls `gram_tokens` for
//! every example ([`sql`]) wherever the session runs it (this process, or a Ballista cluster
//! whose executors read the inputs and the model from the same paths), each result row becomes
//! the pair's stage rows ([`rows_of`]) exactly as a build without `--cluster` makes them (one
//! [`crate::stage::assemble`] for both), and the plan's tasks write them ([`crate::sink`]).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, RecordBatch, StringArray, StructArray, UInt8Array, UInt64Array,
};
use arrow::datatypes::{DataType, UInt8Type, UInt32Type, UInt64Type};
use datafusion::prelude::DataFrame;
use gram_core::fit::Tokens;

use crate::build::BuildOptions;
use crate::cluster::Target;
use crate::error::{Error, OrInternal, Result};
use crate::pairs::Pair;
use crate::read::Reject;
use crate::scan::{Kind, ScanSpec};
use crate::shards::{Item, Rejected};
use crate::sink::{ShardSink, SinkSpec};
use crate::stage::{Example, StageRow, assemble};

/// The scan's table in the plan's session.
pub(crate) const TABLE: &str = "gram_pairs";

/// The query that deduplicates, splits and tokenises the scan's pairs with the model at
/// `model` (an absolute path the executors can read; none: text only): the scan's columns; a
/// pair's split by `gram_split` (as the build's checks computed it); for a duplicate (a pair
/// whose key an earlier pair of the input has), where that first one is (`dup_file`,
/// `dup_row`); and, per example of the other pairs, `gram_tokens`'s struct (`t1`: stage 1 in the pair's seeded order;
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
         raw_label, dedup_key, kind, reason, raw, n_rows, n_pairs, \
         CASE WHEN gram_rank > 1 THEN first_file END AS dup_file, \
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
    let kept = format!("gram_rank = 1 AND kind = {}", Kind::Pair as u8);
    let labeled = format!("{kept} AND label IN ('a', 'b')");
    Ok(format!(
        "SELECT {base}, CASE WHEN {kept} THEN {t1} END AS t1, \
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

/// The pair columns of a result batch (the scan's, as text), where a duplicate's first pair
/// is, and the other kinds' columns.
struct PairColumns {
    text: [StringArray; 10],
    row: UInt64Array,
    dup: (StringArray, UInt64Array),
    kind: UInt8Array,
    /// A reject's reason and raw text.
    reject: (StringArray, StringArray),
    /// A chunk's rows read and pairs mapped.
    counts: (UInt64Array, UInt64Array),
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
        let kind = b.column_by_name("kind").or_internal("kind")?;
        let kind = arrow::compute::cast(kind, &DataType::UInt8).or_internal("kind")?;
        Ok(Self {
            text: text.try_into().ok().or_internal("pair columns")?,
            row: u64s("row")?,
            dup: (self::text(b, "dup_file")?, u64s("dup_row")?),
            kind: kind.as_primitive::<UInt8Type>().clone(),
            reject: (self::text(b, "reason")?, self::text(b, "raw")?),
            counts: (u64s("n_rows")?, u64s("n_pairs")?),
        })
    }

    /// Row `i` if it is not a pair: a reject or a chunk's counts.
    fn other(&self, i: usize) -> Result<Option<Item>> {
        let kind = Kind::of(self.kind.value(i))
            .ok_or_else(|| Error::internal(format!("a scan row of kind {}", self.kind.value(i))))?;
        let source = || self.text[0].value(i).to_string();
        let (reason, raw) = &self.reject;
        let reject = || Reject {
            file: self.text[1].value(i).to_string(),
            row: self.row.value(i),
            reason: reason.value(i).to_string(),
            raw: raw.is_valid(i).then(|| raw.value(i).to_string()),
        };
        Ok(match kind {
            Kind::Pair => None,
            Kind::RowReject | Kind::PairReject => Some(Item::Rejected {
                source: source(),
                reject: reject(),
                row: kind == Kind::RowReject,
            }),
            Kind::Counts => Some(Item::Counts {
                source: source(),
                rows: self.counts.0.value(i),
                pairs: self.counts.1.value(i),
            }),
        })
    }

    /// Where the first pair is, if row `i` is a duplicate of it.
    fn first_of(&self, i: usize) -> Option<String> {
        let (file, row) = &self.dup;
        file.is_valid(i)
            .then(|| crate::dedup::seen_at(file.value(i), row.value(i)))
    }

    /// Row `i` as the checked pair the scan made.
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

/// The rows of one result batch: pairs with their stage rows, assembled from the plan's token
/// columns (`labels`: the ids of `A` and `B`, when a model is given), rejects and counts.
pub(crate) fn rows_of(
    b: &RecordBatch,
    opts: &BuildOptions,
    labels: Option<(u32, u32)>,
) -> Result<Vec<Item>> {
    let pairs = PairColumns::new(b)?;
    let t = |n: &str| b.column_by_name(n).map(|c| c.as_struct().clone());
    let (t1, tab, tba) = (t("t1"), t("t_ab"), t("t_ba"));
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        if let Some(item) = pairs.other(i)? {
            out.push(item);
            continue;
        }
        let p = pairs.pair(i)?;
        if let Some(first) = pairs.first_of(i) {
            let reject = p.duplicate(&first);
            out.push(Item::Made(Box::new((p, Err(Rejected::Row(reject))))));
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
        out.push(Item::Made(Box::new((p, made.map_err(Rejected::Pair)))));
    }
    Ok(out)
}

fn static_split(s: &str) -> Result<&'static str> {
    crate::shards::SPLITS
        .into_iter()
        .find(|x| *x == s)
        .ok_or_else(|| Error::internal(format!("a scanned pair with split `{s}`")))
}

fn static_label(s: Option<&str>) -> Result<Option<&'static str>> {
    match s {
        None => Ok(None),
        Some("a") => Ok(Some("a")),
        Some("b") => Ok(Some("b")),
        Some("tie") => Ok(Some("tie")),
        Some(other) => Err(Error::internal(format!("a scanned pair labeled `{other}`"))),
    }
}

/// Fails early, before any data is read, when `target` is a scheduler nothing answers at.
pub(crate) fn check_reachable(target: &Target) -> Result<()> {
    target.check_reachable().map_err(|msg| Error::Cluster {
        target: target.to_string(),
        msg,
    })
}

/// Runs `sql` over the scan of `scan` on `target`, with its rows written as the build's
/// shards where the plan's tasks run ([`crate::sink`]) in `partitions` partitions (None: the
/// session's default); what each partition wrote.
pub(crate) fn run(
    target: &Target,
    scan: &ScanSpec,
    sql: &str,
    spec: &SinkSpec,
    partitions: Option<usize>,
) -> Result<Vec<crate::sink::Part>> {
    use datafusion::logical_expr::{Extension, LogicalPlan};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .or_internal("starting tokio")?;
    let fail = |e: datafusion::error::DataFusionError| {
        Error::of_plan(&target.to_string(), gram_session::one_line(&e))
    };
    let extension = |node| LogicalPlan::Extension(Extension { node });
    rt.block_on(async {
        let ctx = crate::cluster::connect(target, partitions)
            .await
            .map_err(fail)?;
        // A view of the scan: the query's plan holds the scan node itself.
        let scan = crate::scan::plan(scan).map_err(fail)?;
        ctx.register_table(TABLE, DataFrame::new(ctx.state(), scan).into_view())
            .map_err(fail)?;
        let query = ctx.sql(sql).await.map_err(fail)?;
        let sink = ShardSink::new(query.logical_plan().clone(), spec).map_err(fail)?;
        let written = DataFrame::new(ctx.state(), extension(Arc::new(sink)))
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
