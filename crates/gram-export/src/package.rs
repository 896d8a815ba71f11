//! `gram-export adapter`: a LoRA adapter packaged for release. The folder keeps PEFT's layout
//! (`adapter_config.json` + `adapter_model.safetensors`), its tensors rounded to bf16 by default
//! (what adapters are shipped as: half the bytes of f32), `base_model_name_or_path` set to the
//! name users will find the base under, and nothing of the training run (optimiser state,
//! merged weights, tokenizer copies).

use std::path::PathBuf;

use gram_core::adapter::{Adapter, CONFIG_FILE, WEIGHTS_FILE};
use gram_core::weights::StoreDtype;

use crate::{Error, Result, publish_dir};

/// What to package.
#[derive(Debug, Clone)]
pub struct PackageOptions {
    /// An adapter folder (a gram-train `final/` or checkpoint, or one PEFT saved).
    pub model: PathBuf,
    /// Output folder (appears complete or not at all).
    pub out: PathBuf,
    /// How the tensors are stored.
    pub dtype: StoreDtype,
    /// Written as `base_model_name_or_path`; None keeps the adapter's.
    pub base_name: Option<String>,
    /// Replace an existing output folder.
    pub overwrite: bool,
}

/// What a packaging wrote.
#[derive(Debug, Clone)]
pub struct PackageReport {
    /// Adapted modules (factor pairs).
    pub modules: usize,
    /// Tensors trained whole (`modules_to_save`).
    pub saved: usize,
    /// Parameters in all tensors.
    pub parameters: usize,
    /// Size of `adapter_model.safetensors`.
    pub bytes: u64,
    /// The `base_model_name_or_path` written.
    pub base_model: Option<String>,
}

/// Reads the adapter at `opts.model` and writes it to `opts.out` as `opts.dtype`.
pub fn package_adapter(opts: &PackageOptions) -> Result<PackageReport> {
    if !Adapter::is_adapter_dir(&opts.model) {
        return Err(Error::Usage(format!(
            "{}: not an adapter folder (no {CONFIG_FILE})",
            opts.model.display()
        )));
    }
    let mut adapter = Adapter::read(&opts.model)?;
    if let Some(name) = &opts.base_name {
        adapter.base_model = Some(name.clone());
    }
    let parameters = adapter.tensors().values().map(|t| t.data.len()).sum();
    let bytes = publish_dir(&opts.out, opts.overwrite, |tmp| {
        adapter.write(tmp, opts.dtype)?;
        let path = tmp.join(WEIGHTS_FILE);
        let meta = std::fs::metadata(&path).map_err(|e| Error::File {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(meta.len())
    })?;
    Ok(PackageReport {
        modules: adapter.pairs.len(),
        saved: adapter.saved.len(),
        parameters,
        bytes,
        base_model: adapter.base_model,
    })
}
