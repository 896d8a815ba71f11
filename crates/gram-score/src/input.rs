//! A batch job's input: a Parquet file, or JSON Lines (`.jsonl`, `.ndjson`, `.json`: one object
//! per line, the schema inferred from the whole file), read in chunks of rows.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek};
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{Error, Result};

/// An open input.
pub struct Input {
    /// Its columns.
    pub schema: SchemaRef,
    /// Rows to read (after the limit).
    pub rows: usize,
    /// The rows, `chunk_rows` at a time.
    pub batches: Box<dyn Iterator<Item = Result<RecordBatch>>>,
}

/// Whether `path` is read as JSON Lines (by its extension).
pub fn is_json_lines(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jsonl" | "ndjson" | "json"))
}

/// Opens `path`, keeping at most `limit` rows.
pub fn open(path: &Path, limit: Option<usize>, chunk_rows: usize) -> Result<Input> {
    if is_json_lines(path) {
        json_lines(path, limit, chunk_rows)
    } else {
        parquet(path, limit, chunk_rows)
    }
}

fn parquet(path: &Path, limit: Option<usize>, chunk_rows: usize) -> Result<Input> {
    let file = File::open(path).map_err(|e| Error::file(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::file(path, format!("not a readable Parquet file: {e}")))?;
    let mut rows = usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    let builder = match limit {
        Some(l) => {
            rows = rows.min(l);
            builder.with_limit(l)
        }
        None => builder,
    };
    let schema = builder.schema().clone();
    let reader = builder
        .with_batch_size(chunk_rows)
        .build()
        .map_err(|e| Error::file(path, e))?;
    let p = path.to_path_buf();
    let batches = reader.enumerate().map(move |(k, b)| {
        b.map_err(|e| Error::file(&p, format!("reading rows {}..: {e}", k * chunk_rows)))
    });
    Ok(Input {
        schema,
        rows,
        batches: Box::new(batches),
    })
}

fn json_lines(path: &Path, limit: Option<usize>, chunk_rows: usize) -> Result<Input> {
    let err = |e: &dyn std::fmt::Display| Error::file(path, e.to_string());
    let mut file = BufReader::new(File::open(path).map_err(|e| err(&e))?);
    // Rows: the non-blank lines (arrow's reader skips blank ones too).
    let mut lines = 0usize;
    for (i, line) in (&mut file).lines().enumerate() {
        let line = line.map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))?;
        lines += usize::from(!line.trim().is_empty());
    }
    file.rewind().map_err(|e| err(&e))?;
    let (schema, _) = arrow::json::reader::infer_json_schema_from_seekable(&mut file, None)
        .map_err(|e| Error::file(path, format!("not JSON Lines: {e}")))?;
    file.rewind().map_err(|e| err(&e))?;
    let schema = Arc::new(schema);
    let reader = arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(chunk_rows)
        .build(file)
        .map_err(|e| err(&e))?;
    let rows = limit.map_or(lines, |l| lines.min(l));
    let p = path.to_path_buf();
    let mut left = rows;
    let batches = reader
        .enumerate()
        .map(move |(k, b)| {
            b.map_err(|e| Error::file(&p, format!("reading rows {}..: {e}", k * chunk_rows)))
        })
        .map_while(move |b| {
            if left == 0 {
                return None;
            }
            Some(b.map(|b| {
                let n = b.num_rows().min(left);
                left -= n;
                b.slice(0, n)
            }))
        });
    Ok(Input {
        schema,
        rows,
        batches: Box::new(batches),
    })
}
