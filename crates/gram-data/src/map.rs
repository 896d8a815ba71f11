//! The SQL mapping step: each chunk of a source is registered as the DataFusion table `source`
//! and the spec's SQL maps it onto raw pairs. UDFs cover what SQL alone can't (splitting
//! hh-rlhf's `\n\nHuman:` / `\n\nAssistant:` transcripts).

use std::sync::Arc;

use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray, StringArray, UInt64Array};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
use datafusion::prelude::SessionContext;

use crate::error::{Error, OrInternal, Result};
use crate::spec::Spec;

/// One mapped pair, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedPair {
    /// Input file.
    pub file: String,
    /// Input row.
    pub row: u64,
    /// The source's own id, if the mapping gives one.
    pub id: Option<String>,
    /// Prompt.
    pub prompt: Option<String>,
    /// First response.
    pub response_a: Option<String>,
    /// Second response.
    pub response_b: Option<String>,
    /// a | b | tie | null.
    pub label: Option<String>,
    /// JSON metadata.
    pub metadata: Option<String>,
    /// A reason the mapping itself gives to reject the row.
    pub reject: Option<String>,
}

/// Splits an hh-rlhf transcript at its last `\n\nAssistant:`: (conversation before, final answer).
pub fn split_transcript(t: &str) -> Option<(String, String)> {
    const A: &str = "\n\nAssistant:";
    let i = t.rfind(A)?;
    let before = t[..i].trim();
    let answer = t[i + A.len()..].trim().to_string();
    // A single human turn is the question itself; longer conversations keep their roles.
    let prompt = match before.strip_prefix("Human:") {
        Some(q) if !before.contains("\n\nAssistant:") && !q.contains("\n\nHuman:") => {
            q.trim().to_string()
        }
        _ => before.to_string(),
    };
    Some((prompt, answer))
}

fn transcript_udf(
    name: &str,
    pick: fn((String, String)) -> String,
) -> datafusion::logical_expr::ScalarUDF {
    create_udf(
        name,
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let input = arrays[0].as_string::<i32>();
            let out: StringArray = input
                .iter()
                .map(|v| v.and_then(split_transcript).map(pick))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
        }),
    )
}

/// Runs a spec's SQL over chunks.
pub struct Mapper {
    ctx: SessionContext,
    rt: tokio::runtime::Runtime,
    sql: String,
    /// The spec file (named in errors).
    path: PathBuf,
}

const REQUIRED: [&str; 5] = ["_file", "_row", "prompt", "response_a", "response_b"];
const OPTIONAL: [&str; 4] = ["id", "label", "metadata", "_reject"];

impl Mapper {
    /// Prepares the SQL and checks it against the source schema (an empty chunk), so a bad query
    /// or an unknown column fails before any data is read.
    pub fn new(spec: &Spec) -> Result<Self> {
        let ctx = SessionContext::new();
        ctx.register_udf(transcript_udf("hh_prompt", |(p, _)| p));
        ctx.register_udf(transcript_udf("hh_response", |(_, r)| r));
        ctx.register_udf(create_udf(
            "json_str",
            vec![DataType::Utf8],
            DataType::Utf8,
            Volatility::Immutable,
            Arc::new(|args: &[ColumnarValue]| {
                let arrays = ColumnarValue::values_to_arrays(args)?;
                let input = arrays[0].as_string::<i32>();
                let out: StringArray = input
                    .iter()
                    .map(|v| {
                        Some(v.map_or_else(
                            || "null".to_string(),
                            |s| serde_json::Value::from(s).to_string(),
                        ))
                    })
                    .collect();
                Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
            }),
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .or_internal("starting tokio")?;
        let m = Self {
            ctx,
            rt,
            sql: spec.sql.clone(),
            path: spec.path.clone(),
        };
        let empty = RecordBatch::new_empty(crate::read::source_schema(spec));
        let out_schema = m.plan_schema(empty).map_err(|e| {
            Error::spec(
                &spec.path,
                format!("[map] sql: {}", first_line(&e.to_string())),
            )
        })?;
        for c in REQUIRED {
            if !out_schema.iter().any(|n| n == c) {
                return Err(Error::spec(
                    &spec.path,
                    format!(
                        "[map] sql must select a column `{c}` (required: {})",
                        REQUIRED.join(", ")
                    ),
                ));
            }
        }
        for n in &out_schema {
            if !REQUIRED.contains(&n.as_str()) && !OPTIONAL.contains(&n.as_str()) {
                return Err(Error::spec(
                    &spec.path,
                    format!(
                        "[map] sql selects `{n}`, which is not a raw-pairs column ({}, {})",
                        REQUIRED.join(", "),
                        OPTIONAL.join(", ")
                    ),
                ));
            }
        }
        Ok(m)
    }

    fn plan_schema(&self, batch: RecordBatch) -> datafusion::error::Result<Vec<String>> {
        self.rt.block_on(async {
            self.ctx.deregister_table("source")?;
            self.ctx.register_batch("source", batch)?;
            let df = self.ctx.sql(&self.sql).await?;
            let names = df
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            df.collect().await?;
            Ok(names)
        })
    }

    /// Maps one chunk of `file`.
    pub fn map(&self, batch: RecordBatch, file: &Path) -> Result<Vec<MappedPair>> {
        let batches = self
            .rt
            .block_on(async {
                self.ctx.deregister_table("source")?;
                self.ctx.register_batch("source", batch)?;
                self.ctx.sql(&self.sql).await?.collect().await
            })
            .map_err(|e| {
                let e = first_line(&e.to_string()).to_string();
                Error::spec(&self.path, format!("mapping {}: {e}", file.display()))
            })?;
        let mut out = Vec::new();
        for b in batches {
            let text = |name: &str| -> Result<Option<StringArray>> {
                match b.column_by_name(name) {
                    None => Ok(None),
                    Some(c) => {
                        let c = cast(c, &DataType::Utf8).map_err(|e| {
                            Error::spec(
                                &self.path,
                                format!("[map] sql: column `{name}` is not text: {e}"),
                            )
                        })?;
                        Ok(Some(c.as_string::<i32>().clone()))
                    }
                }
            };
            let files = text("_file")?.or_internal("a mapped chunk without `_file`")?;
            let rows = b
                .column_by_name("_row")
                .or_internal("a mapped chunk without `_row`")?;
            let rows = cast(rows, &DataType::UInt64).map_err(|e| {
                Error::spec(
                    &self.path,
                    format!("[map] sql: column `_row` is not an integer: {e}"),
                )
            })?;
            let rows: &UInt64Array = rows.as_primitive();
            let (id, prompt, ra, rb, label, md, rej) = (
                text("id")?,
                text("prompt")?,
                text("response_a")?,
                text("response_b")?,
                text("label")?,
                text("metadata")?,
                text("_reject")?,
            );
            let get = |a: &Option<StringArray>, i: usize| {
                a.as_ref()
                    .filter(|a| a.is_valid(i))
                    .map(|a| a.value(i).to_string())
            };
            for i in 0..b.num_rows() {
                out.push(MappedPair {
                    file: files.value(i).to_string(),
                    row: rows.value(i),
                    id: get(&id, i),
                    prompt: get(&prompt, i),
                    response_a: get(&ra, i),
                    response_b: get(&rb, i),
                    label: get(&label, i),
                    metadata: get(&md, i),
                    reject: get(&rej, i),
                });
            }
        }
        Ok(out)
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_split_at_the_last_assistant_turn() {
        let t = "\n\nHuman: hi there\n\nAssistant: hello!";
        assert_eq!(
            split_transcript(t),
            Some(("hi there".into(), "hello!".into()))
        );
        let t = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d";
        assert_eq!(
            split_transcript(t),
            Some(("Human: a\n\nAssistant: b\n\nHuman: c".into(), "d".into()))
        );
        assert_eq!(split_transcript("no turns"), None);
    }
}
