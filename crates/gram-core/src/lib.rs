//! gram-core: the shared vocabulary of GRAM-rs, with no burn in it. Record types, the GRAM
//! prompt templates and label tokens, tokenizers and chat templates, readers of checkpoint
//! formats (HF config.json, safetensors, GGUF), and errors.

pub mod adapter;
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod error;
pub mod export;
pub mod fit;
pub mod gguf;
pub mod schema;
pub mod template;
pub mod tokenizer;
pub mod weights;

pub use adapter::{Adapter, LoraConfig, Target};
pub use checkpoint::{Checkpoint, Format};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{Error, Result};
pub use template::{LabelIds, PromptStyle, Templates};
pub use tokenizer::GramTokenizer;
pub use weights::{F32Tensor, Weights};

use std::io::Write;
use std::path::Path;

/// How every Parquet file GRAM-rs writes is stored (ZSTD-compressed pages); callers add their
/// own metadata.
pub fn parquet_props() -> parquet::file::properties::WriterPropertiesBuilder {
    parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
}

/// Builds a folder through `fill` in a temporary folder beside `out` (`.NAME.tmp-PID`), then
/// renames it into place, replacing what `out` held: `out` appears complete or not at all, and
/// a failed `fill` leaves no trace. Whether `out` may be replaced is the caller's to decide.
pub fn publish_dir<T, E: From<Error>>(
    out: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let value = match fill(&tmp) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(value)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, then rename, so a
/// crash leaves either the old file or the new one, never half of one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
