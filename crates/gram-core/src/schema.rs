//! The Arrow schemas of every dataset the tools write or read, loaded from the versioned files in
//! `schemas/` (compiled in, so a binary needs no checkout), and the check run on every read and
//! write: a column missing or of another type is a one-line error naming the file and column.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Which dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dataset {
    /// Pairs as a source gives them, after the pipeline's mapping.
    RawPairs,
    /// Stage-1 (unlabeled pairs).
    Stage1,
    /// Stage-2 (labeled judge prompts).
    Stage2,
    /// Rows that reached no dataset, with reasons.
    Rejects,
}

impl Dataset {
    fn source(self) -> &'static str {
        match self {
            Self::RawPairs => include_str!("../../../schemas/raw_pairs.v1.json"),
            Self::Stage1 => include_str!("../../../schemas/stage1.v1.json"),
            Self::Stage2 => include_str!("../../../schemas/stage2.v2.json"),
            Self::Rejects => include_str!("../../../schemas/rejects.v1.json"),
        }
    }

    /// The schema's name and version, as stored in Parquet metadata (`gram.schema`).
    pub fn tag(self) -> String {
        let f = self.file();
        format!("{}.v{}", f.name, f.version)
    }

    fn file(self) -> SchemaFile {
        // The files are part of the build; a parse failure is a bug caught by the tests below.
        serde_json::from_str(self.source()).unwrap_or_else(|e| panic!("schemas/{self:?}: {e}"))
    }

    /// The Arrow schema, with `gram.schema` metadata.
    pub fn schema(self) -> SchemaRef {
        let f = self.file();
        let fields: Vec<Field> = f
            .fields
            .iter()
            .map(|c| {
                Field::new(
                    &c.name,
                    parse_type(&c.ty).unwrap_or(DataType::Null),
                    c.nullable,
                )
            })
            .collect();
        let mut md = std::collections::HashMap::new();
        md.insert(
            "gram.schema".to_string(),
            format!("{}.v{}", f.name, f.version),
        );
        Arc::new(Schema::new_with_metadata(fields, md))
    }
}

#[derive(Deserialize)]
struct SchemaFile {
    name: String,
    version: u32,
    fields: Vec<FieldFile>,
}

#[derive(Deserialize)]
struct FieldFile {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    nullable: bool,
}

/// Parses the type names used in `schemas/*.json` (and in pipeline specs).
pub fn parse_type(s: &str) -> Option<DataType> {
    Some(match s.trim() {
        "utf8" | "string" => DataType::Utf8,
        "bool" => DataType::Boolean,
        "int64" => DataType::Int64,
        "uint32" => DataType::UInt32,
        "uint64" => DataType::UInt64,
        "float64" => DataType::Float64,
        other => {
            let inner = other.strip_prefix("list<")?.strip_suffix('>')?;
            DataType::List(Arc::new(Field::new("item", parse_type(inner)?, true)))
        }
    })
}

fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) | (DataType::LargeList(x), DataType::List(y)) => {
            same_type(x.data_type(), y.data_type())
        }
        (DataType::Utf8View | DataType::LargeUtf8, DataType::Utf8) => true,
        _ => a == b,
    }
}

/// The file that says a dataset folder (a build's, or a sharded scoring output) is complete,
/// and names its files: written last.
pub const DATASET_MANIFEST: &str = "manifest.json";

/// The shards of one split in a dataset folder (`DIR/{split}-*.parquet`), in name order. When
/// the build's `manifest.json` beside DIR names its files, those are the shards (a file the
/// manifest does not name, such as one a lost task wrote after the build ended, is not part of
/// the dataset; a named one that is missing is an error); otherwise every file that matches.
pub fn split_files(dir: &Path, split: &str) -> std::io::Result<Vec<std::path::PathBuf>> {
    let is_shard =
        |name: &str| name.starts_with(&format!("{split}-")) && name.ends_with(".parquet");
    if let Some(listed) = manifest_files(dir)? {
        let mut files = Vec::new();
        for name in listed.iter().filter(|n| is_shard(n)) {
            let path = dir.join(name);
            if !path.is_file() {
                let msg = format!("{} is in manifest.json but not on disk", path.display());
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, msg));
            }
            files.push(path);
        }
        files.sort();
        return Ok(files);
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_shard))
        .collect();
    files.sort();
    Ok(files)
}

/// The names of DIR's files that the manifest beside DIR lists (its `files`, paths relative to
/// the build's folder), if it lists them.
fn manifest_files(dir: &Path) -> std::io::Result<Option<Vec<String>>> {
    let (Some(parent), Some(sub)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str())) else {
        return Ok(None);
    };
    let path = parent.join(DATASET_MANIFEST);
    let Ok(text) = std::fs::read(&path) else {
        return Ok(None);
    };
    let bad = |e: &dyn std::fmt::Display| {
        let msg = format!("{}: {e}", path.display());
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
    };
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(&e))?;
    let Some(files) = v.get("files").and_then(|f| f.as_array()) else {
        return Ok(None);
    };
    let prefix = format!("{sub}/");
    let mut names = Vec::new();
    for f in files {
        let f = f
            .as_str()
            .ok_or_else(|| bad(&"`files` holds a non-string"))?;
        if let Some(name) = f.strip_prefix(&prefix).filter(|n| !n.contains('/')) {
            names.push(name.to_string());
        }
    }
    Ok(Some(names))
}

/// Checks that `actual` has every column of `dataset` with its type (extra columns allowed);
/// `path` names the file in the error.
pub fn check(actual: &Schema, dataset: Dataset, path: &Path) -> Result<()> {
    let want = dataset.schema();
    for f in want.fields() {
        match actual.field_with_name(f.name()) {
            Err(_) => {
                return Err(Error::format(
                    path,
                    format!(
                        "column `{}` of the {} schema is missing",
                        f.name(),
                        dataset.tag()
                    ),
                ));
            }
            Ok(a) if !same_type(a.data_type(), f.data_type()) => {
                return Err(Error::format(
                    path,
                    format!(
                        "column `{}` is {}, the {} schema says {}",
                        f.name(),
                        a.data_type(),
                        dataset.tag(),
                        f.data_type()
                    ),
                ));
            }
            Ok(a)
                if a.is_nullable()
                    && !f.is_nullable()
                    && actual.metadata().get("gram.schema").is_none() =>
            {
                // Files not written by us may mark columns nullable; values are checked on use.
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_files_are_the_manifests_when_it_lists_them() -> std::io::Result<()> {
        let root = std::env::temp_dir().join(format!("gram-split-files-{}", std::process::id()));
        let dir = root.join("stage2");
        std::fs::create_dir_all(&dir)?;
        for f in [
            "train-p1-00000.parquet",
            "train-p2-00000.parquet",
            "valid-p1-00000.parquet",
        ] {
            std::fs::write(dir.join(f), b"")?;
        }
        let names = |v: Vec<std::path::PathBuf>| -> Vec<String> {
            v.iter()
                .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
                .collect()
        };
        // No manifest: every matching file.
        let all = names(split_files(&dir, "train")?);
        assert_eq!(all, ["train-p1-00000.parquet", "train-p2-00000.parquet"]);
        // A manifest that lists its files: only those (train-p2 is a stray).
        let manifest = r#"{"files": ["stage2/train-p1-00000.parquet", "stage2/valid-p1-00000.parquet", "stage1/train-p2-00000.parquet"]}"#;
        std::fs::write(root.join("manifest.json"), manifest)?;
        assert_eq!(
            names(split_files(&dir, "train")?),
            ["train-p1-00000.parquet"]
        );
        // A listed file that is gone is an error.
        std::fs::remove_file(dir.join("train-p1-00000.parquet"))?;
        let Err(err) = split_files(&dir, "train") else {
            panic!("a listed file that is gone was not an error");
        };
        assert!(err.to_string().contains("not on disk"), "{err}");
        // A manifest without `files` (an older build): every matching file again.
        std::fs::write(root.join("manifest.json"), "{}")?;
        assert_eq!(
            names(split_files(&dir, "train")?),
            ["train-p2-00000.parquet"]
        );
        std::fs::remove_dir_all(&root)
    }

    #[test]
    fn every_schema_file_parses() {
        for d in [
            Dataset::RawPairs,
            Dataset::Stage1,
            Dataset::Stage2,
            Dataset::Rejects,
        ] {
            let s = d.schema();
            assert!(
                s.fields().iter().all(|f| f.data_type() != &DataType::Null),
                "{d:?}: unknown type"
            );
            let want = if d == Dataset::Stage2 { ".v2" } else { ".v1" };
            assert!(d.tag().ends_with(want), "{}", d.tag());
        }
    }

    #[test]
    fn check_names_the_column() {
        let s = Schema::new(vec![Field::new("id", DataType::Int64, false)]);
        let e = check(&s, Dataset::RawPairs, Path::new("x.parquet"))
            .expect_err("a raw pairs file needs more than `id`")
            .to_string();
        assert!(
            e.contains("x.parquet") && e.contains("`id`") && e.contains("Int64"),
            "{e}"
        );
        let e = check(&Schema::empty(), Dataset::Stage2, Path::new("y"))
            .expect_err("an empty schema is refused")
            .to_string();
        assert!(e.contains("missing"), "{e}");
        check(&Dataset::Stage1.schema(), Dataset::Stage1, Path::new("z"))
            .expect("own schema passes");
    }
}
