//! Pipeline specs (`pipelines/*.toml`): where a source's files are, how to read them, which
//! columns they have, and the DataFusion SQL that maps them onto the raw-pairs schema. A new
//! source format needs only a new spec file.
//!
//! ```toml
//! name = "generic-chosen-rejected"
//! [source]
//! format = "jsonl"              # jsonl | json | csv | parquet (".gz" files are decompressed)
//! files = ["data/*.jsonl.gz"]   # globs, relative to this file
//! columns = { prompt = "utf8", chosen = "utf8", rejected = "utf8", meta = "json?" }
//! [map]
//! sql = "SELECT _file, _row, prompt, chosen AS response_a, rejected AS response_b, 'a' AS label FROM source"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use serde::Deserialize;

/// Source file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line (optionally gzip-compressed).
    Jsonl,
    /// One JSON array of objects per file.
    Json,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
}

/// A declared column type. `?` at the end means the value may be missing or null.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    /// `utf8`, `int64`, `float64`, `bool`, `list<utf8>`, or `json` (any value, kept as JSON text).
    pub kind: ColumnKind,
    /// Missing and null values are allowed.
    pub optional: bool,
}

/// The value kinds a spec can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// A string.
    Utf8,
    /// An integer.
    Int64,
    /// A number.
    Float64,
    /// A boolean.
    Bool,
    /// A list of strings.
    ListUtf8,
    /// Any JSON value, stored as its JSON text.
    Json,
}

impl ColumnType {
    fn parse(s: &str) -> Option<Self> {
        let (s, optional) = match s.strip_suffix('?') {
            Some(x) => (x, true),
            None => (s, false),
        };
        let kind = match s.trim() {
            "utf8" | "string" => ColumnKind::Utf8,
            "int64" | "int" => ColumnKind::Int64,
            "float64" | "float" => ColumnKind::Float64,
            "bool" => ColumnKind::Bool,
            "list<utf8>" | "list<string>" => ColumnKind::ListUtf8,
            "json" => ColumnKind::Json,
            _ => return None,
        };
        Some(Self { kind, optional })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    description: Option<String>,
    source: SourceFile,
    map: MapFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    format: Format,
    files: Vec<String>,
    columns: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    sql: String,
}

/// A parsed, checked pipeline spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The spec's name (becomes the `source` column).
    pub name: String,
    /// What it reads.
    pub description: String,
    /// Where the spec file is.
    pub path: PathBuf,
    /// Input format.
    pub format: Format,
    /// File globs as written (relative to the spec's folder unless absolute).
    pub files: Vec<String>,
    /// Declared columns, in name order.
    pub columns: Vec<(String, ColumnType)>,
    /// The SQL mapping onto raw pairs; reads the table `source`.
    pub sql: String,
}

impl Spec {
    /// Reads a spec file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::spec(path, format!("cannot read the pipeline spec: {e}")))?;
        Self::parse(&text, path)
    }

    /// A spec from its text, as if read from `path` (how a plan's tasks get the client's specs).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let f: SpecFile =
            toml::from_str(text).map_err(|e| Error::spec(path, e.to_string().trim()))?;
        let mut columns = Vec::new();
        for (name, ty) in &f.source.columns {
            let t = ColumnType::parse(ty).ok_or_else(|| {
                Error::spec(path, format!(
                    "column `{name}` has unknown type `{ty}` (use utf8, int64, float64, bool, list<utf8> or json, with ? if optional)"
                ))
            })?;
            if name.starts_with('_') {
                return Err(Error::spec(
                    path,
                    format!("column `{name}`: names starting with `_` are reserved"),
                ));
            }
            columns.push((name.clone(), t));
        }
        if columns.is_empty() {
            return Err(Error::spec(path, "[source] columns is empty"));
        }
        if f.source.files.is_empty() {
            return Err(Error::spec(path, "[source] files is empty"));
        }
        Ok(Self {
            name: f.name,
            description: f.description.unwrap_or_default(),
            path: path.to_path_buf(),
            format: f.source.format,
            files: f.source.files,
            columns,
            sql: f.map.sql,
        })
    }

    /// The input files: globs expanded (relative to the spec's folder), sorted, deduplicated.
    /// `override_files` replaces the spec's own list.
    pub fn resolve_files(&self, override_files: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        let patterns: Vec<PathBuf> = if override_files.is_empty() {
            self.files
                .iter()
                .map(|f| {
                    if Path::new(f).is_absolute() {
                        PathBuf::from(f)
                    } else {
                        base.join(f)
                    }
                })
                .collect()
        } else {
            override_files.to_vec()
        };
        let mut out = Vec::new();
        for p in &patterns {
            let s = p.to_string_lossy();
            let mut found = false;
            let matches = glob::glob(&s)
                .map_err(|e| Error::spec(&self.path, format!("bad file pattern `{s}`: {e}")))?;
            for m in matches {
                let m = m.map_err(|e| Error::input(e.path(), e.error().to_string()))?;
                if m.is_file() {
                    out.push(m);
                    found = true;
                }
            }
            if !found {
                return Err(Error::spec(&self.path, format!("no file matches `{s}`")));
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}
