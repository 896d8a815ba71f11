//! Outputs on an object store: `--out s3://BUCKET/PREFIX` or `--out file:///ABSOLUTE/PATH`,
//! through the object_store crate (the release DataFusion uses). An S3 store takes its settings
//! from the environment of the process that writes (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL` for an S3-compatible server, `AWS_ALLOW_HTTP=true` for a
//! plain-HTTP one), so every executor that writes needs them too.
//!
//! An object store has no folder to rename into place: a dataset's objects are written under
//! its prefix one by one (each put is whole or absent), and the one that says it is complete,
//! its manifest, is put last.

use std::path::Path;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Whether `--out` names an object store (a URL) rather than a folder.
pub fn is_url(s: &str) -> bool {
    s.contains("://")
}

/// A prefix on an object store, where a job's outputs go.
#[derive(Debug, Clone)]
pub struct Location {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Key,
}

impl Location {
    /// Opens `s3://BUCKET/PREFIX` (settings from the `AWS_*` environment) or
    /// `file:///ABSOLUTE/PATH` (created if missing). Nothing is read or written yet.
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim_end_matches('/').to_string();
        let bad = |why: &str| Err(format!("--out {url}: {why}"));
        let (store, prefix): (Arc<dyn ObjectStore>, String) =
            if let Some(rest) = url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return bad("name the bucket (s3://BUCKET/PREFIX)");
                }
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| format!("--out {url}: {}", crate::one_line(&e)))?;
                (Arc::new(s3), prefix.to_string())
            } else if let Some(path) = url.strip_prefix("file://") {
                if !path.starts_with('/') || path.len() < 2 {
                    return bad("a file:// URL takes an absolute path (file:///data/gram)");
                }
                std::fs::create_dir_all(path).map_err(|e| format!("--out {url}: {e}"))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| format!("--out {url}: {}", crate::one_line(&e)))?;
                (Arc::new(fs), String::new())
            } else {
                return bad("only s3:// and file:// URLs are supported (or give a folder)");
            };
        let prefix = Key::parse(&prefix).map_err(|e| format!("--out {url}: {e}"))?;
        Ok(Self { url, store, prefix })
    }

    /// The URL as given (without a trailing `/`).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> Key {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |k, part| k.join(part))
    }

    fn fail(&self, rel: &str, e: &dyn std::fmt::Display) -> String {
        let sep = if rel.is_empty() { "" } else { "/" };
        format!("{}{sep}{rel}: {}", self.url, crate::one_line(e))
    }

    /// Every object under the prefix, as paths relative to it (`stage1/train-00000.parquet`).
    pub async fn list(&self) -> Result<Vec<String>, String> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let metas: Vec<_> = self
            .store
            .list(prefix)
            .try_collect()
            .await
            .map_err(|e| self.fail("", &e))?;
        let mut rels: Vec<String> = metas
            .into_iter()
            .filter_map(|m| {
                m.location
                    .prefix_match(&self.prefix)
                    .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>())
            })
            .map(|parts| parts.join("/"))
            .collect();
        rels.sort();
        Ok(rels)
    }

    /// Puts the local file `local` at `rel` (whole, or not at all).
    pub async fn put_file(&self, local: &Path, rel: &str) -> Result<(), String> {
        let bytes = tokio::fs::read(local)
            .await
            .map_err(|e| format!("{}: {e}", local.display()))?;
        self.put(rel, bytes).await
    }

    /// Puts `bytes` at `rel` (whole, or not at all).
    pub async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), String> {
        self.store
            .put(&self.key(rel), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.fail(rel, &e))
    }

    /// Whether an object is at `rel`.
    pub async fn exists(&self, rel: &str) -> Result<bool, String> {
        match self.store.head(&self.key(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.fail(rel, &e)),
        }
    }

    /// The object at `rel`.
    pub async fn get(&self, rel: &str) -> Result<Vec<u8>, String> {
        let got = self
            .store
            .get(&self.key(rel))
            .await
            .map_err(|e| self.fail(rel, &e))?;
        let bytes = got.bytes().await.map_err(|e| self.fail(rel, &e))?;
        Ok(bytes.to_vec())
    }

    /// Deletes the objects at `rels` (one missing already is no error).
    pub async fn delete(&self, rels: &[String]) -> Result<(), String> {
        for rel in rels {
            match self.store.delete(&self.key(rel)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.fail(rel, &e)),
            }
        }
        Ok(())
    }

    /// Puts every file under the local folder `dir` at its path relative to `dir`, except those
    /// `skip` names (relative paths, `/`-separated); the paths put.
    pub async fn put_dir(
        &self,
        dir: &Path,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>, String> {
        let mut rels = files_under(dir)?;
        rels.retain(|rel| !skip(rel));
        self.put_files(dir, &rels).await?;
        Ok(rels)
    }

    /// Puts a finished dataset folder `dir`: every file but `manifest`, then `manifest` last, so
    /// that the prefix holds a complete dataset once the manifest is there.
    pub async fn put_dataset(&self, dir: &Path, manifest: &str) -> Result<(), String> {
        self.put_dir(dir, &|rel| rel == manifest).await?;
        self.put_file(&dir.join(manifest), manifest).await
    }

    /// Puts the files `rels` (paths relative to the local folder `dir`) at the same paths.
    pub async fn put_files(&self, dir: &Path, rels: &[String]) -> Result<(), String> {
        for rel in rels {
            self.put_file(&dir.join(rel), rel).await?;
        }
        Ok(())
    }
}

/// Every file under `dir`, as sorted `/`-separated paths relative to it.
pub fn files_under(dir: &Path) -> Result<Vec<String>, String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let sub = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.path().is_dir() {
                walk(&e.path(), &sub, out)?;
            } else {
                out.push(sub);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Runs `f` to completion on a runtime of its own: the object-store calls of a tool that is
/// not async itself.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting tokio: {e}"))?;
    Ok(rt.block_on(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_folders_and_bad_ones_say_why() {
        assert!(is_url("s3://b/p") && is_url("file:///x") && !is_url("data/x"));
        let err = |u: &str| Location::parse(u).err().unwrap_or_default();
        assert!(
            err("s3:///x").contains("name the bucket"),
            "{}",
            err("s3:///x")
        );
        assert!(err("file://rel/x").contains("absolute"));
        assert!(err("gs://b/x").contains("only s3:// and file://"));
    }

    #[test]
    fn a_file_url_puts_lists_gets_and_deletes_relative_paths() -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("gram-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("file://{}/out/", dir.display());
        let loc = Location::parse(&url)?;
        assert_eq!(loc.url(), url.trim_end_matches('/'));
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("stage1")).map_err(|e| e.to_string())?;
        std::fs::write(src.join("stage1/a.parquet"), b"a").map_err(|e| e.to_string())?;
        std::fs::write(src.join("manifest.json"), b"{}").map_err(|e| e.to_string())?;
        let put = block_on(loc.put_dir(&src, &|r| r == "manifest.json"))??;
        assert_eq!(put, ["stage1/a.parquet"]);
        assert_eq!(block_on(loc.list())??, ["stage1/a.parquet"]);
        assert_eq!(block_on(loc.get("stage1/a.parquet"))??, b"a");
        assert!(block_on(loc.exists("stage1/a.parquet"))?? && !block_on(loc.exists("b"))??);
        assert!(dir.join("out/stage1/a.parquet").is_file());
        let gone = ["stage1/a.parquet".to_string(), "never.parquet".to_string()];
        block_on(loc.delete(&gone))??;
        assert!(block_on(loc.list())??.is_empty());
        std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())
    }
}
