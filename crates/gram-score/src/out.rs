//! Where a job's output goes: a local file, or an object (`--out s3://BUCKET/KEY.parquet`,
//! `file:///PATH/NAME.parquet`) put on its store when the job is complete. Either way the job
//! runs on a local file (for an object, in a work folder named after its URL, so that a killed
//! job run again finds its parts and resumes).

use std::path::{Path, PathBuf};

use gram_session::store::{Location, block_on, is_url};

use crate::{Error, Result};

/// A job's output.
pub enum Output {
    /// A local file.
    File(PathBuf),
    /// An object named `name` under `loc`, written first to `local`.
    Object {
        /// The URL as given.
        url: String,
        /// Where the object goes: its URL up to the last `/`.
        loc: Location,
        /// The object's name under `loc`.
        name: String,
        /// The local file the job writes.
        local: PathBuf,
    },
}

fn store<T>(f: impl std::future::Future<Output = std::result::Result<T, String>>) -> Result<T> {
    block_on(f).map_err(Error::Runtime)?.map_err(Error::Input)
}

impl Output {
    /// The output `out` names; for an object, the job's local file goes under `work_dir`
    /// (default: a folder in the system's temporary folder named after the URL).
    pub fn new(out: &Path, work_dir: Option<&Path>) -> Result<Self> {
        let text = out.to_string_lossy();
        if !is_url(&text) {
            return Ok(Self::File(out.to_path_buf()));
        }
        let url = text.to_string();
        let (parent, name) = url
            .rsplit_once('/')
            .filter(|(p, n)| !n.is_empty() && p.contains("://") && !p.ends_with("//"))
            .ok_or_else(|| {
                Error::Input(format!("--out {url}: give the object's name at its end"))
            })?;
        let loc = Location::parse(parent).map_err(Error::Input)?;
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
            name: name.to_string(),
            local: work.join(name),
            url,
        })
    }

    /// Whether the output exists already.
    pub fn exists(&self) -> Result<bool> {
        match self {
            Self::File(p) => Ok(p.exists()),
            Self::Object { loc, name, .. } => store(loc.exists(name)),
        }
    }

    /// The local file the job writes.
    pub fn local(&self) -> &Path {
        match self {
            Self::File(p) | Self::Object { local: p, .. } => p,
        }
    }

    /// Puts the finished local file on the store (whole, or not at all) and removes it; a
    /// local output is already in place.
    pub fn publish(&self) -> Result<()> {
        if let Self::Object {
            loc, name, local, ..
        } = self
        {
            store(loc.put_file(local, name))?;
            std::fs::remove_file(local).map_err(|e| Error::file(local, e))?;
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
            Output::new(Path::new("x/y.parquet"), None)?,
            Output::File(_)
        ));
        for bad in ["s3://bucket/", "s3://", "file:///"] {
            let e = Output::new(Path::new(bad), None)
                .err()
                .map(|e| e.to_string());
            assert!(e.is_some_and(|e| e.contains(bad)), "{bad}");
        }
        let dir = std::env::temp_dir().join(format!("gram-out-{}", std::process::id()));
        let url = format!("file://{}/store/s.parquet", dir.display());
        let out = Output::new(Path::new(&url), Some(&dir.join("work")))?;
        assert_eq!(out.local(), dir.join("work/s.parquet"));
        assert!(!out.exists()?);
        std::fs::write(out.local(), b"rows").map_err(|e| Error::file(&dir, e))?;
        out.publish()?;
        assert!(out.exists()? && !out.local().exists());
        assert_eq!(
            std::fs::read(dir.join("store/s.parquet")).ok(),
            Some(b"rows".to_vec())
        );
        std::fs::remove_dir_all(&dir).map_err(|e| Error::file(&dir, e))
    }
}
