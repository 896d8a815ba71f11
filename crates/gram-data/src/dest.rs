//! Where a build's dataset lands, and how it appears only when complete: a folder (the build
//! writes a temporary folder beside it and renames it into place), or a prefix on an object
//! store (`--out s3://...` or `file://...`: the build writes into a local work folder and the
//! plan's tasks put their shards on the store; the rest goes up at the end, the manifest last).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use gram_core::schema::DATASET_MANIFEST as MANIFEST;
use gram_session::store::{Location, block_on, files_under, is_url};

use crate::build::BuildOptions;
use crate::error::{Error, Result};
use crate::sink::SinkDest;

/// A build's output.
pub(crate) enum Dest {
    /// A folder: `out`, in `parent`, named `name`.
    Folder {
        out: PathBuf,
        parent: PathBuf,
        name: String,
    },
    /// A prefix on an object store.
    Store(Location),
}

fn store_err(msg: String) -> Error {
    Error::Store(msg)
}

/// Runs an object-store call from the (synchronous) build.
fn on_store<T>(f: impl std::future::Future<Output = std::result::Result<T, String>>) -> Result<T> {
    block_on(f).map_err(Error::internal)?.map_err(store_err)
}

impl Dest {
    /// The output `--out` names; a URL is opened (nothing read yet).
    pub(crate) fn of(opts: &BuildOptions) -> Result<Self> {
        let text = opts.out.to_string_lossy();
        if is_url(&text) {
            return Location::parse(&text)
                .map(Self::Store)
                .map_err(Error::Options);
        }
        let parent = opts
            .out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let name = opts
            .out
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("out")
            .to_string();
        Ok(Self::Folder {
            out: opts.out.clone(),
            parent,
            name,
        })
    }

    /// Fails, before any data is read, when the output holds something and `overwrite` is off.
    pub(crate) fn check(&self, overwrite: bool) -> Result<()> {
        if overwrite {
            return Ok(());
        }
        let held = match self {
            Self::Folder { out, .. } => out.exists(),
            Self::Store(loc) => !on_store(loc.list())?.is_empty(),
        };
        if held {
            return Err(Error::Options(format!(
                "{} already exists (use --overwrite to replace it)",
                self
            )));
        }
        Ok(())
    }

    /// The empty local folder the build writes into. On a store with `--overwrite`, the old
    /// dataset is removed here, its manifest first (a store cannot swap a prefix in one step).
    pub(crate) fn prepare(&self, opts: &BuildOptions) -> Result<PathBuf> {
        let tmp = match self {
            Self::Folder { parent, name, .. } => {
                std::fs::create_dir_all(parent).map_err(|e| Error::output(parent, e))?;
                remove_stale_partials(parent, name);
                parent.join(format!(".{name}.partial-{}", std::process::id()))
            }
            Self::Store(loc) => {
                let old = on_store(loc.list())?;
                if !old.is_empty() && opts.overwrite {
                    on_store(loc.delete(&[MANIFEST.to_string()]))?;
                    on_store(loc.delete(&old))?;
                }
                let base = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                base.join(format!("gram-data-{}-{nanos}", std::process::id()))
            }
        };
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::output(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::output(&tmp, e))?;
        Ok(tmp)
    }

    /// Where the plan's tasks write their shards: the build's folder (absolute, so that every
    /// executor finds it), or the store itself.
    pub(crate) fn sink(&self, tmp: &Path) -> Result<SinkDest> {
        match self {
            Self::Folder { .. } => {
                let dir = std::fs::canonicalize(tmp).map_err(|e| Error::output(tmp, e))?;
                let dir = dir
                    .to_str()
                    .ok_or_else(|| Error::output(&dir, "not a UTF-8 path"))?;
                Ok(SinkDest::Folder(dir.to_string()))
            }
            Self::Store(loc) => Ok(SinkDest::Store(loc.url().to_string())),
        }
    }

    /// Removes the data files that no writer reported (see [`crate::shards::strays`]), from
    /// the build's folder and from the store.
    pub(crate) fn remove_strays(&self, tmp: &Path, keep: &HashSet<String>) -> Result<()> {
        let local = files_under(tmp).map_err(|e| Error::output(tmp, e))?;
        for rel in crate::shards::strays(&local, keep) {
            let path = tmp.join(&rel);
            std::fs::remove_file(&path).map_err(|e| Error::output(&path, e))?;
        }
        if let Self::Store(loc) = self {
            let strays = crate::shards::strays(&on_store(loc.list())?, keep);
            on_store(loc.delete(&strays))?;
        }
        Ok(())
    }

    /// Makes the finished build in `tmp` the dataset: renamed into place, or put on the store
    /// (the manifest last) and `tmp` removed.
    pub(crate) fn publish(&self, tmp: &Path) -> Result<()> {
        match self {
            Self::Folder { out, parent, name } => move_into_place(tmp, out, parent, name),
            Self::Store(loc) => {
                on_store(loc.put_dataset(tmp, MANIFEST))?;
                std::fs::remove_dir_all(tmp).map_err(|e| Error::output(tmp, e))
            }
        }
    }

    /// After a failed build: removes its folder, and on a store everything it put there (the
    /// prefix was empty, or emptied, when it started).
    pub(crate) fn discard(&self, tmp: &Path) {
        let _ = std::fs::remove_dir_all(tmp);
        if let Self::Store(loc) = self
            && let Ok(Ok(objects)) = block_on(loc.list())
        {
            let _ = block_on(loc.delete(&objects));
        }
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Folder { out, .. } => write!(f, "{}", out.display()),
            Self::Store(loc) => f.write_str(loc.url()),
        }
    }
}

/// Renames the finished `tmp` folder to `out`, replacing an old `out` (moved aside first).
fn move_into_place(tmp: &Path, out: &Path, parent: &Path, name: &str) -> Result<()> {
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &old)
            .map_err(|e| Error::output(out, format!("moving the old folder aside: {e}")))?;
        std::fs::rename(tmp, out).map_err(|e| Error::output(out, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::output(&old, e))?;
    } else {
        std::fs::rename(tmp, out)
            .map_err(|e| Error::output(out, format!("moving the build into place: {e}")))?;
    }
    Ok(())
}

/// Removes `.NAME.partial-PID` folders that killed builds left behind (their process is gone).
fn remove_stale_partials(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = format!(".{name}.partial-");
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
