//! Where a job's output goes: a local file, or an object (`--out s3://BUCKET/KEY.parquet`,
//! `file:///PATH/NAME.parquet`) put on its store when the job is complete; with `--sharded`, a
//! local folder or an object-store prefix of the job's parts and a manifest, put last. Either
//! way the job runs on a local file or folder (for the store, in a work folder named after its
//! URL, so that a killed job run again finds its parts and resumes).

use std::path::{Path, PathBuf};

use gram_session::store::{Location, block_on, is_url};

use crate::{Error, Result};

/// A job's output.
pub enum Output {
    /// A local file.
    File(PathBuf),
    /// An object named `name` under `loc` (None: `loc` is a prefix that gets the files of
    /// the folder `local`, the manifest last), written first to `local`.
    Object {
        /// The URL as given.
        url: String,
        /// Where the object goes: its URL up to the last `/` (or the whole URL for a prefix).
        loc: Location,
        /// The object's name under `loc`.
        name: Option<String>,
        /// The local file or folder the job writes.
        local: PathBuf,
    },
}

/// The file that makes a sharded output complete.
pub use gram_core::schema::DATASET_MANIFEST as MANIFEST;

fn store<T>(f: impl std::future::Future<Output = std::result::Result<T, String>>) -> Result<T> {
    block_on(f).map_err(Error::Runtime)?.map_err(Error::Input)
}

impl Output {
    /// The output `out` names (`sharded`: a folder or prefix of shards); for the store, the
    /// job's local file or folder goes under `work_dir` (default: a folder in the system's
    /// temporary folder named after the URL).
    pub fn new(out: &Path, work_dir: Option<&Path>, sharded: bool) -> Result<Self> {
        let text = out.to_string_lossy();
        if !is_url(&text) {
            return Ok(Self::File(out.to_path_buf()));
        }
        // A prefix may be given with its trailing `/`.
        let url = match sharded {
            true => text.trim_end_matches('/').to_string(),
            false => text.to_string(),
        };
        let (parent, name) = url
            .rsplit_once('/')
            .filter(|(p, n)| !n.is_empty() && p.contains("://") && !p.ends_with("//"))
            .ok_or_else(|| {
                Error::Input(format!("--out {url}: give the object's name at its end"))
            })?;
        let (loc, object) = match sharded {
            true => (Location::parse(&url), None),
            false => (Location::parse(parent), Some(name.to_string())),
        };
        let loc = loc.map_err(Error::Input)?;
        let folder: String = url
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let work = match work_dir {
            Some(d) => d.to_path_buf(),
            None => std::env::temp_dir().join(format!("gram-score-{folder}")),
        };
        std::fs::create_dir_all(&work).map_err(|e| Error::file(&work, e))?;
        Ok(Self::Object {
            loc,
            name: object,
            local: work.join(name),
            url,
        })
    }

    /// Whether the output exists already (a sharded one on a store: its manifest).
    pub fn exists(&self) -> Result<bool> {
        match self {
            Self::File(p) => Ok(p.exists()),
            Self::Object { loc, name, .. } => {
                store(loc.exists(name.as_deref().unwrap_or(MANIFEST)))
            }
        }
    }

    /// The local file or folder the job writes.
    pub fn local(&self) -> &Path {
        match self {
            Self::File(p) | Self::Object { local: p, .. } => p,
        }
    }

    /// Puts the finished local file on the store (whole, or not at all), or the folder's files
    /// and then its manifest, and removes them; a local output is already in place.
    pub fn publish(&self) -> Result<()> {
        match self {
            Self::File(_) => {}
            Self::Object {
                loc,
                name: Some(name),
                local,
                ..
            } => {
                store(loc.put_file(local, name))?;
                std::fs::remove_file(local).map_err(|e| Error::file(local, e))?;
            }
            Self::Object {
                loc,
                name: None,
                local,
                ..
            } => {
                store(loc.put_dataset(local, MANIFEST))?;
                std::fs::remove_dir_all(local).map_err(|e| Error::file(local, e))?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Object { url, .. } => f.write_str(url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_need_a_name_and_files_stay_files() -> Result<()> {
        assert!(matches!(
            Output::new(Path::new("x/y.parquet"), None, false)?,
            Output::File(_)
        ));
        for bad in ["s3://bucket/", "s3://", "file:///"] {
            let e = Output::new(Path::new(bad), None, false)
                .err()
                .map(|e| e.to_string());
            assert!(e.is_some_and(|e| e.contains(bad)), "{bad}");
        }
        let dir = std::env::temp_dir().join(format!("gram-out-{}", std::process::id()));
        let url = format!("file://{}/store/s.parquet", dir.display());
        let out = Output::new(Path::new(&url), Some(&dir.join("work")), false)?;
        assert_eq!(out.local(), dir.join("work/s.parquet"));
        assert!(!out.exists()?);
        std::fs::write(out.local(), b"rows").map_err(|e| Error::file(&dir, e))?;
        out.publish()?;
        assert!(out.exists()? && !out.local().exists());
        assert_eq!(
            std::fs::read(dir.join("store/s.parquet")).ok(),
            Some(b"rows".to_vec())
        );
        // A sharded output: the folder's files under the prefix, complete with its manifest.
        let url = format!("file://{}/store/shards/", dir.display());
        let out = Output::new(Path::new(&url), Some(&dir.join("work")), true)?;
        assert_eq!(out.local(), dir.join("work/shards"));
        std::fs::create_dir_all(out.local()).map_err(|e| Error::file(&dir, e))?;
        for f in ["part-000000.parquet", MANIFEST] {
            std::fs::write(out.local().join(f), f).map_err(|e| Error::file(&dir, e))?;
        }
        assert!(!out.exists()?);
        out.publish()?;
        assert!(out.exists()? && !out.local().exists());
        let shard = std::fs::read(dir.join("store/shards/part-000000.parquet")).ok();
        assert_eq!(shard, Some(b"part-000000.parquet".to_vec()));
        std::fs::remove_dir_all(&dir).map_err(|e| Error::file(&dir, e))
    }
}
