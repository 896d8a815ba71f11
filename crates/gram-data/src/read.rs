//! Source readers: JSONL (plain or gzip), JSON arrays, CSV and Parquet, streamed in chunks of
//! Arrow record batches with the spec's declared columns plus `_file` and `_row`. A row that
//! cannot be read as declared (malformed JSON, a missing or mistyped column, non-UTF-8 bytes)
//! becomes a reject with its reason; a file that cannot be read at all (truncated gzip or
//! Parquet, empty, not the format) is an error naming the file and where it broke.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, OrInternal, Result};
use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder,
    StringBuilder, UInt64Builder,
};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};

use crate::spec::{ColumnKind, ColumnType, Format, Spec};

/// A row that reached no dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// The input file.
    pub file: String,
    /// 1-based line (JSONL, CSV), element (JSON) or row (Parquet).
    pub row: u64,
    /// Why.
    pub reason: String,
    /// The row's text, when it could be read.
    pub raw: Option<String>,
}

/// One chunk of a source file.
pub struct Chunk {
    /// Declared columns + `_file` + `_row`.
    pub batch: RecordBatch,
    /// Rows of this chunk that could not be read.
    pub rejects: Vec<Reject>,
}

/// Counts bytes as they are read (for progress on compressed input).
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// The Arrow schema of a spec's source table.
pub fn source_schema(spec: &Spec) -> SchemaRef {
    let mut fields: Vec<Field> = spec
        .columns
        .iter()
        .map(|(n, t)| {
            let dt = match t.kind {
                ColumnKind::Utf8 | ColumnKind::Json => DataType::Utf8,
                ColumnKind::Int64 => DataType::Int64,
                ColumnKind::Float64 => DataType::Float64,
                ColumnKind::Bool => DataType::Boolean,
                ColumnKind::ListUtf8 => {
                    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
                }
            };
            Field::new(n, dt, t.optional)
        })
        .collect();
    fields.push(Field::new("_file", DataType::Utf8, false));
    fields.push(Field::new("_row", DataType::UInt64, false));
    Arc::new(Schema::new(fields))
}

enum ColBuilder {
    Utf8(StringBuilder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Bool(BooleanBuilder),
    List(ListBuilder<StringBuilder>),
}

/// Builds a chunk from JSON-like rows, checking each value against its declared type.
struct RowBuilder {
    schema: SchemaRef,
    columns: Vec<(String, ColumnType)>,
    builders: Vec<ColBuilder>,
    file: String,
    rows: UInt64Builder,
    len: usize,
    rejects: Vec<Reject>,
    /// CSV gives every value as text: parse numbers and booleans from it.
    from_text: bool,
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl RowBuilder {
    fn new(spec: &Spec, file: &str, from_text: bool) -> Self {
        let builders = spec
            .columns
            .iter()
            .map(|(_, t)| match t.kind {
                ColumnKind::Utf8 | ColumnKind::Json => ColBuilder::Utf8(StringBuilder::new()),
                ColumnKind::Int64 => ColBuilder::Int64(Int64Builder::new()),
                ColumnKind::Float64 => ColBuilder::Float64(Float64Builder::new()),
                ColumnKind::Bool => ColBuilder::Bool(BooleanBuilder::new()),
                ColumnKind::ListUtf8 => ColBuilder::List(ListBuilder::new(StringBuilder::new())),
            })
            .collect();
        Self {
            schema: source_schema(spec),
            columns: spec.columns.clone(),
            builders,
            file: file.to_string(),
            rows: UInt64Builder::new(),
            len: 0,
            rejects: Vec::new(),
            from_text,
        }
    }

    fn reject(&mut self, row: u64, reason: String, raw: Option<String>) {
        self.rejects.push(Reject {
            file: self.file.clone(),
            row,
            reason,
            raw,
        });
    }

    /// Checks every declared column of `obj`; appends the row, or records why not.
    fn push(&mut self, row: u64, obj: &Map<String, Value>, raw: &str) {
        // Validate first, so that a bad row leaves the builders untouched.
        for (name, t) in &self.columns {
            let v = obj.get(name);
            let bad = match (v, t.kind) {
                (None, _) if !t.optional => Some(format!("column `{name}` is missing")),
                (Some(Value::Null), _) if !t.optional => Some(format!("column `{name}` is null")),
                (None | Some(Value::Null), _) => None,
                (Some(_), ColumnKind::Json) => None,
                (Some(Value::String(s)), ColumnKind::Utf8) => {
                    let _ = s;
                    None
                }
                (Some(Value::String(s)), ColumnKind::Int64) if self.from_text => {
                    (s.trim().parse::<i64>().is_err() && !(t.optional && s.is_empty()))
                        .then(|| format!("column `{name}`: `{s}` is not an integer"))
                }
                (Some(Value::String(s)), ColumnKind::Float64) if self.from_text => {
                    (s.trim().parse::<f64>().is_err() && !(t.optional && s.is_empty()))
                        .then(|| format!("column `{name}`: `{s}` is not a number"))
                }
                (Some(Value::String(s)), ColumnKind::Bool) if self.from_text => {
                    (!(matches!(s.trim(), "true" | "false") || (t.optional && s.is_empty())))
                        .then(|| format!("column `{name}`: `{s}` is not true/false"))
                }
                (Some(Value::Number(n)), ColumnKind::Int64) => n
                    .as_i64()
                    .is_none()
                    .then(|| format!("column `{name}`: {n} is not an integer")),
                (Some(Value::Number(_)), ColumnKind::Float64)
                | (Some(Value::Bool(_)), ColumnKind::Bool) => None,
                (Some(Value::Array(a)), ColumnKind::ListUtf8) => {
                    a.iter().position(|x| !x.is_string()).map(|i| {
                        format!(
                            "column `{name}`: element {i} is {}, expected a string",
                            kind_name(&a[i])
                        )
                    })
                }
                (Some(other), kind) => Some(format!(
                    "column `{name}`: expected {}, got {}",
                    match kind {
                        ColumnKind::Utf8 => "a string",
                        ColumnKind::Int64 => "an integer",
                        ColumnKind::Float64 => "a number",
                        ColumnKind::Bool => "a boolean",
                        ColumnKind::ListUtf8 => "an array of strings",
                        ColumnKind::Json => "any value",
                    },
                    kind_name(other)
                )),
            };
            if let Some(reason) = bad {
                self.reject(row, reason, Some(raw.to_string()));
                return;
            }
        }
        for ((name, t), b) in self.columns.iter().zip(self.builders.iter_mut()) {
            let v = obj.get(name).filter(|v| !v.is_null());
            let v = if self.from_text && t.optional && t.kind != ColumnKind::Utf8 {
                v.filter(|v| v.as_str() != Some(""))
            } else {
                v
            };
            match (b, v) {
                (ColBuilder::Utf8(b), None) => b.append_null(),
                (ColBuilder::Utf8(b), Some(Value::String(s))) if t.kind == ColumnKind::Utf8 => {
                    b.append_value(s)
                }
                (ColBuilder::Utf8(b), Some(v)) => b.append_value(v.to_string()),
                (ColBuilder::Int64(b), Some(Value::String(s))) => {
                    b.append_option(s.trim().parse::<i64>().ok())
                }
                (ColBuilder::Int64(b), v) => b.append_option(v.and_then(Value::as_i64)),
                (ColBuilder::Float64(b), Some(Value::String(s))) => {
                    b.append_option(s.trim().parse::<f64>().ok())
                }
                (ColBuilder::Float64(b), v) => b.append_option(v.and_then(Value::as_f64)),
                (ColBuilder::Bool(b), Some(Value::String(s))) => {
                    b.append_option(s.trim().parse::<bool>().ok())
                }
                (ColBuilder::Bool(b), v) => b.append_option(v.and_then(Value::as_bool)),
                (ColBuilder::List(b), Some(Value::Array(a))) => {
                    for x in a {
                        b.values().append_option(x.as_str());
                    }
                    b.append(true);
                }
                (ColBuilder::List(b), _) => b.append(false),
            }
        }
        self.rows.append_value(row);
        self.len += 1;
    }

    /// Hands a chunk to `sink` once `chunk_rows` rows (read or rejected) have gathered.
    fn flush_if_full(
        &mut self,
        chunk_rows: usize,
        sink: &mut dyn FnMut(Chunk) -> Result<()>,
    ) -> Result<()> {
        if self.len + self.rejects.len() >= chunk_rows {
            sink(self.finish()?)?;
        }
        Ok(())
    }

    /// Hands over whatever is left at the end of a file.
    fn flush_rest(&mut self, sink: &mut dyn FnMut(Chunk) -> Result<()>) -> Result<()> {
        if self.len > 0 || !self.rejects.is_empty() {
            sink(self.finish()?)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Chunk> {
        let mut arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .map(|b| -> ArrayRef {
                match b {
                    ColBuilder::Utf8(b) => Arc::new(b.finish()),
                    ColBuilder::Int64(b) => Arc::new(b.finish()),
                    ColBuilder::Float64(b) => Arc::new(b.finish()),
                    ColBuilder::Bool(b) => Arc::new(b.finish()),
                    ColBuilder::List(b) => Arc::new(b.finish()),
                }
            })
            .collect();
        let mut files = StringBuilder::new();
        for _ in 0..self.len {
            files.append_value(&self.file);
        }
        arrays.push(Arc::new(files.finish()));
        arrays.push(Arc::new(self.rows.finish()));
        self.len = 0;
        let batch = RecordBatch::try_new(self.schema.clone(), arrays)
            .or_internal("building a source batch")?;
        Ok(Chunk {
            batch,
            rejects: std::mem::take(&mut self.rejects),
        })
    }
}

fn is_gzip(path: &Path) -> Result<bool> {
    let mut f = File::open(path).map_err(|e| Error::input(path, e))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(|e| Error::input(path, e))?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// Opens a file, decompressing gzip and skipping a UTF-8 byte-order mark; `counter` counts the
/// (compressed) bytes read.
fn open(path: &Path, counter: Arc<AtomicU64>) -> Result<Box<dyn Read + Send>> {
    let f = File::open(path).map_err(|e| Error::input(path, e))?;
    let counted = Counting {
        inner: f,
        n: counter,
    };
    let text: Box<dyn Read + Send> = if is_gzip(path)? {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(counted)))
    } else {
        Box::new(counted)
    };
    without_bom(path, text)
}

/// `text` past a UTF-8 byte-order mark at its start (editors on Windows write one; it is not
/// part of the first row).
fn without_bom(path: &Path, text: Box<dyn Read + Send>) -> Result<Box<dyn Read + Send>> {
    let mut r = BufReader::with_capacity(1 << 16, text);
    let mut head = [0u8; 3];
    let mut n = 0;
    while n < 3 {
        let k = r.read(&mut head[n..]).map_err(|e| {
            Error::input(
                path,
                format!("unreadable (truncated or corrupt gzip?): {e}"),
            )
        })?;
        if k == 0 {
            break;
        }
        n += k;
    }
    let rest: Box<dyn Read + Send> = if head[..n] == [0xEF, 0xBB, 0xBF] {
        Box::new(r)
    } else {
        Box::new(std::io::Cursor::new(head[..n].to_vec()).chain(r))
    };
    Ok(rest)
}

/// Reads one source file in chunks of about `chunk_rows` rows, calling `sink` for each.
/// `counter` receives the bytes read so far (for progress).
pub fn read_file(
    spec: &Spec,
    path: &Path,
    chunk_rows: usize,
    counter: Arc<AtomicU64>,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    let name = path.display().to_string();
    read_file_as(spec, path, &name, chunk_rows, counter, sink)
}

/// [`read_file`], with the rows' `_file` (and their rejects' file) named `file` instead of
/// `path` (a plan's task opens the absolute path of the file the build names as given).
pub fn read_file_as(
    spec: &Spec,
    path: &Path,
    file: &str,
    chunk_rows: usize,
    counter: Arc<AtomicU64>,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::input(path, e))?;
    if meta.len() == 0 {
        return Err(Error::input(path, "empty file (no rows)"));
    }
    let file = file.to_string();
    match spec.format {
        Format::Jsonl => read_jsonl(spec, path, &file, chunk_rows, counter, sink),
        Format::Json => read_json_array(spec, path, &file, chunk_rows, counter, sink),
        Format::Csv => read_csv(spec, path, &file, chunk_rows, counter, sink),
        Format::Parquet => read_parquet(spec, path, &file, chunk_rows, counter, sink),
    }
}

fn read_jsonl(
    spec: &Spec,
    path: &Path,
    file: &str,
    chunk_rows: usize,
    counter: Arc<AtomicU64>,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    let r = BufReader::with_capacity(1 << 20, open(path, counter)?);
    let rows = jsonl_lines(spec, path, file, r, 0, chunk_rows, sink)?;
    if rows == 0 {
        return Err(Error::input(path, "no rows (only blank lines)"));
    }
    Ok(())
}

/// A part of an uncompressed JSON Lines file that a task reads alone: bytes `start..end`, both
/// at the start of a line, the first of which is line `first_line + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LineRange {
    /// First byte.
    pub start: u64,
    /// Past the last byte.
    pub end: u64,
    /// Lines before `start`.
    pub first_line: u64,
}

/// `path` (a JSON Lines file of `spec`) cut at line starts into ranges of about `bytes` bytes
/// each; None when it is not cut (another format, gzip, or not larger than `bytes`).
pub fn line_ranges(spec: &Spec, path: &Path, bytes: u64) -> Result<Option<Vec<LineRange>>> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::input(path, e))?
        .len();
    if !matches!(spec.format, Format::Jsonl) || len <= bytes.max(1) || is_gzip(path)? {
        return Ok(None);
    }
    let file = File::open(path).map_err(|e| Error::input(path, e))?;
    let mut f = BufReader::with_capacity(1 << 20, file);
    let bytes = bytes.max(1);
    // The range being cut starts at `start`, after `first` lines; `lines` so far, to `pos`.
    let (mut ranges, mut start, mut first, mut lines, mut pos) = (Vec::new(), 0, 0, 0, 0u64);
    loop {
        let buf = f.fill_buf().map_err(|e| Error::input(path, e))?;
        if buf.is_empty() {
            break;
        }
        for (j, _) in buf.iter().enumerate().filter(|(_, c)| **c == b'\n') {
            lines += 1;
            let next = pos + j as u64 + 1;
            if next - start >= bytes && next < len {
                let end = next;
                ranges.push(LineRange {
                    start,
                    end,
                    first_line: first,
                });
                (start, first) = (next, lines);
            }
        }
        let n = buf.len();
        pos += n as u64;
        f.consume(n);
    }
    ranges.push(LineRange {
        start,
        end: len,
        first_line: first,
    });
    Ok(Some(ranges))
}

/// Reads the lines of `range` of the JSON Lines file `path` (as [`read_file_as`] reads a
/// whole one; a range may hold only blank lines).
pub fn read_jsonl_range(
    spec: &Spec,
    path: &Path,
    file: &str,
    range: LineRange,
    chunk_rows: usize,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    use std::io::Seek;
    let mut f = File::open(path).map_err(|e| Error::input(path, e))?;
    f.seek(std::io::SeekFrom::Start(range.start))
        .map_err(|e| Error::input(path, e))?;
    let part: Box<dyn Read + Send> = Box::new(f.take(range.end - range.start));
    let part = match range.start {
        0 => without_bom(path, part)?,
        _ => part,
    };
    let r = BufReader::with_capacity(1 << 20, part);
    jsonl_lines(spec, path, file, r, range.first_line, chunk_rows, sink).map(|_| ())
}

/// The lines of `r`, the first being line `first_line + 1` of `path`, as rows and rejects;
/// the rows it held (blank lines are none).
fn jsonl_lines(
    spec: &Spec,
    path: &Path,
    file: &str,
    mut r: impl BufRead,
    first_line: u64,
    chunk_rows: usize,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<u64> {
    let mut b = RowBuilder::new(spec, file, false);
    let mut line = Vec::new();
    let mut lineno = first_line;
    let mut rows = 0u64;
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line).map_err(|e| {
            Error::input(
                path,
                format!("unreadable after line {lineno} (truncated or corrupt gzip?): {e}"),
            )
        })?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let text = match std::str::from_utf8(&line) {
            Ok(t) => t,
            Err(e) => {
                b.reject(
                    lineno,
                    format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
                    Some(String::from_utf8_lossy(&line).into_owned()),
                );
                rows += 1;
                continue;
            }
        };
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue; // blank lines separate nothing and hold no row
        }
        rows += 1;
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(obj)) => b.push(lineno, &obj, text),
            Ok(other) => b.reject(
                lineno,
                format!("line is {}, expected a JSON object", kind_name(&other)),
                Some(text.to_string()),
            ),
            Err(e) => b.reject(
                lineno,
                format!("malformed JSON: {e}"),
                Some(text.to_string()),
            ),
        }
        b.flush_if_full(chunk_rows, sink)?;
    }
    b.flush_rest(sink)?;
    Ok(rows)
}

fn read_json_array(
    spec: &Spec,
    path: &Path,
    file: &str,
    chunk_rows: usize,
    counter: Arc<AtomicU64>,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    // A JSON array is one document: it is parsed whole (use JSONL for inputs that do not fit).
    let mut bytes = Vec::new();
    open(path, counter)?.read_to_end(&mut bytes).map_err(|e| {
        Error::input(
            path,
            format!("unreadable (truncated or corrupt gzip?): {e}"),
        )
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        Error::input(
            path,
            format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
        )
    })?;
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::input(path, format!("malformed JSON: {e}")))?;
    let Value::Array(items) = v else {
        return Err(Error::input(
            path,
            format!("expected a JSON array of objects, found {}", kind_name(&v)),
        ));
    };
    if items.is_empty() {
        return Err(Error::input(path, "empty array (no rows)"));
    }
    let mut b = RowBuilder::new(spec, file, false);
    for (i, item) in items.iter().enumerate() {
        let row = i as u64 + 1;
        match item {
            Value::Object(obj) => b.push(row, obj, &item.to_string()),
            other => b.reject(
                row,
                format!("element is {}, expected an object", kind_name(other)),
                Some(other.to_string()),
            ),
        }
        b.flush_if_full(chunk_rows, sink)?;
    }
    b.flush_rest(sink)
}

fn read_csv(
    spec: &Spec,
    path: &Path,
    file: &str,
    chunk_rows: usize,
    counter: Arc<AtomicU64>,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    let mut r = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(open(path, counter)?);
    let headers: Vec<String> = r
        .byte_headers()
        .map_err(|e| Error::input(path, format!("unreadable header row: {e}")))?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_string())
        .collect();
    let mut b = RowBuilder::new(spec, file, true);
    let mut rec = csv::ByteRecord::new();
    let mut rows = 0u64;
    loop {
        let more = match r.read_byte_record(&mut rec) {
            Ok(m) => m,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(Error::input(
                        path,
                        format!("unreadable at line {line} (truncated or corrupt gzip?): {e}"),
                    ));
                }
                rows += 1;
                b.reject(line, format!("malformed CSV: {e}"), None);
                continue;
            }
        };
        if !more {
            break;
        }
        rows += 1;
        let line = rec.position().map_or(0, |p| p.line());
        let raw = String::from_utf8_lossy(rec.as_slice()).into_owned();
        if rec.len() != headers.len() {
            b.reject(
                line,
                format!("{} fields, the header has {}", rec.len(), headers.len()),
                Some(raw),
            );
        } else {
            let mut obj = Map::new();
            let mut bad = None;
            for (h, v) in headers.iter().zip(rec.iter()) {
                match std::str::from_utf8(v) {
                    Ok(s) => {
                        obj.insert(h.clone(), Value::String(s.to_string()));
                    }
                    Err(e) => {
                        bad = Some(format!(
                            "column `{h}`: not UTF-8 (invalid byte at offset {})",
                            e.valid_up_to()
                        ))
                    }
                }
            }
            match bad {
                Some(reason) => b.reject(line, reason, Some(raw)),
                None => b.push(line, &obj, &raw),
            }
        }
        b.flush_if_full(chunk_rows, sink)?;
    }
    if rows == 0 {
        return Err(Error::input(path, "no rows below the header"));
    }
    b.flush_rest(sink)
}

fn read_parquet(
    spec: &Spec,
    path: &Path,
    file: &str,
    chunk_rows: usize,
    counter: Arc<AtomicU64>,
    sink: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let f = File::open(path).map_err(|e| Error::input(path, e))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| {
        Error::input(
            path,
            format!("not a readable Parquet file (truncated?): {e}"),
        )
    })?;
    let file_schema = builder.schema().clone();
    let total = builder.metadata().file_metadata().num_rows().max(1) as u64;
    for (name, _) in &spec.columns {
        if file_schema.field_with_name(name).is_err() {
            return Err(Error::input(
                path,
                format!(
                    "column `{name}` declared by {} is not in the file",
                    spec.path.display()
                ),
            ));
        }
    }
    let reader = builder
        .with_batch_size(chunk_rows)
        .build()
        .map_err(|e| Error::input(path, e))?;
    let target = source_schema(spec);
    let mut next_row = 1u64;
    for batch in reader {
        let batch = batch.map_err(|e| {
            Error::input(
                path,
                format!("unreadable after row {} (truncated?): {e}", next_row - 1),
            )
        })?;
        let n = batch.num_rows();
        let mut keep = vec![true; n];
        let mut rejects = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for (i, (name, t)) in spec.columns.iter().enumerate() {
            let col = batch
                .column_by_name(name)
                .or_internal("a Parquet column checked above is gone")?;
            let want = target.field(i).data_type();
            let arr = if t.kind == ColumnKind::Json && col.data_type() != &DataType::Utf8 {
                return Err(Error::input(
                    path,
                    format!("column `{name}`: only string columns can be declared json in Parquet"),
                ));
            } else {
                cast(col, want).map_err(|e| {
                    Error::input(
                        path,
                        format!(
                            "column `{name}` is {}, declared {:?}: {e}",
                            col.data_type(),
                            t.kind
                        ),
                    )
                })?
            };
            if !t.optional {
                for (r, k) in keep.iter_mut().enumerate() {
                    if *k && arr.is_null(r) {
                        *k = false;
                        rejects.push(Reject {
                            file: file.to_string(),
                            row: next_row + r as u64,
                            reason: format!("column `{name}` is null"),
                            raw: None,
                        });
                    }
                }
            }
            arrays.push(arr);
        }
        let mut fb = StringBuilder::new();
        let mut rb = UInt64Builder::new();
        for r in 0..n {
            fb.append_value(file);
            rb.append_value(next_row + r as u64);
        }
        arrays.push(Arc::new(fb.finish()));
        arrays.push(Arc::new(rb.finish()));
        let out =
            RecordBatch::try_new(target.clone(), arrays).or_internal("building a source batch")?;
        let out = filter_record_batch(&out, &BooleanArray::from(keep))
            .or_internal("filtering null rows")?;
        next_row += n as u64;
        counter.store(size * (next_row - 1) / total, Ordering::Relaxed);
        sink(Chunk {
            batch: out,
            rejects,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jsonl_spec() -> Spec {
        let text = "name = \"t\"\n[source]\nformat = \"jsonl\"\nfiles = [\"x.jsonl\"]\n\
                    columns = { prompt = \"utf8\" }\n[map]\nsql = \"SELECT 1\"\n";
        Spec::parse(text, Path::new("t.toml")).expect("a spec")
    }

    #[test]
    fn line_ranges_cut_at_line_starts_and_count_the_lines_before() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gram-ranges-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::output(&dir, e))?;
        let path = dir.join("x.jsonl");
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!("{{\"prompt\": \"{}\"}}\n", "p".repeat(i % 7)));
            if i % 9 == 0 {
                text.push('\n');
            }
        }
        text.push_str("{\"prompt\": \"last, no newline\"}");
        std::fs::write(&path, &text).map_err(|e| Error::output(&path, e))?;
        let spec = jsonl_spec();
        let len = text.len() as u64;
        assert_eq!(
            line_ranges(&spec, &path, len)?,
            None,
            "a file no larger than a range"
        );
        let ranges = line_ranges(&spec, &path, 100)?.expect("ranges");
        assert!(ranges.len() > 5, "{ranges:?}");
        let bytes = text.as_bytes();
        let mut at = 0;
        for r in &ranges {
            assert_eq!(r.start, at, "contiguous");
            assert!(
                r.start == 0 || bytes[r.start as usize - 1] == b'\n',
                "{r:?}"
            );
            let before = bytes[..r.start as usize]
                .iter()
                .filter(|c| **c == b'\n')
                .count();
            assert_eq!(r.first_line, before as u64, "{r:?}");
            at = r.end;
        }
        assert_eq!(at, len);
        // Read range by range: every row once, with the line numbers of the whole file.
        let mut rows = Vec::new();
        for r in &ranges {
            read_jsonl_range(&spec, &path, "x.jsonl", *r, 8, &mut |c| {
                let col = c.batch.column_by_name("_row").or_internal("_row")?;
                let col = col.as_any().downcast_ref::<arrow::array::UInt64Array>();
                rows.extend(col.or_internal("u64")?.values().iter().copied());
                Ok(())
            })?;
        }
        let mut whole = Vec::new();
        read_file(&spec, &path, 8, Arc::new(AtomicU64::new(0)), &mut |c| {
            let col = c.batch.column_by_name("_row").or_internal("_row")?;
            let col = col.as_any().downcast_ref::<arrow::array::UInt64Array>();
            whole.extend(col.or_internal("u64")?.values().iter().copied());
            Ok(())
        })?;
        assert_eq!(rows, whole);
        assert_eq!(rows.len(), 41);
        std::fs::remove_dir_all(&dir).map_err(|e| Error::output(&dir, e))
    }
}
