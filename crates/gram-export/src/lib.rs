//! gram-export: compiles a checkpoint the model core loads (HF folder, GGUF, a gram-train
//! output) into an ONNX graph (opset 17, dynamic batch and sequence axes, left padding), with
//! the tokenizer files and `gram-export.json` beside it, and checks onnxruntime against burn.
//!
//! Burn has no ONNX export, so the graph is emitted here from the configuration and the weights
//! ([`decoder`]); the parity check ([`verify`]) is what shows it computes the same function.

pub mod decoder;
pub mod graph;
pub mod proto;
pub mod verify;

use std::path::{Path, PathBuf};

use gram_core::export::{ExportManifest, FORMAT_VERSION, HeadKind, MANIFEST};
use gram_core::{Checkpoint, LabelIds, PromptStyle, Templates};

pub use decoder::Head;

/// Errors of an export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the checkpoint or tokenizer.
    #[error(transparent)]
    Core(#[from] gram_core::Error),
    /// The burn side of the check.
    #[error(transparent)]
    Model(#[from] gram_model::Error),
    /// The graph needs a tensor the checkpoint lacks.
    #[error(transparent)]
    Tensor(#[from] decoder::MissingTensor),
    /// The onnxruntime side.
    #[error(transparent)]
    Score(#[from] gram_score::Error),
    /// Writing the folder.
    #[error("{path}: {msg}")]
    File {
        /// Where.
        path: PathBuf,
        /// What.
        msg: String,
    },
    /// The check failed.
    #[error("verification failed: {0}")]
    Verify(String),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// Exit status 1 (the user's to fix) or 2 (ours).
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Core(e) => e.is_user_error(),
            Self::Model(_) | Self::Verify(_) => false,
            _ => true,
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Checkpoint: HF folder or GGUF file.
    pub model: PathBuf,
    /// Tokenizer to use instead of the checkpoint's own (a folder with tokenizer.json, or a GGUF).
    pub tokenizer: Option<PathBuf>,
    /// Output folder (created; must not exist unless `overwrite`).
    pub out: PathBuf,
    /// The head.
    pub head: HeadKind,
    /// Prompt style; None: the chat template when the tokenizer has one.
    pub style: Option<PromptStyle>,
    /// Longest sequence the scorer feeds; None: the model's context length.
    pub max_tokens: Option<usize>,
    /// Run onnxruntime against burn before finishing; the export fails beyond `tolerance`.
    pub verify: bool,
    /// Largest allowed absolute logit difference in the check.
    pub tolerance: f32,
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// Weights beyond this many bytes go to `model.onnx.data` instead of inside the graph
    /// (protobuf's 2 GiB limit); [`graph::INLINE_LIMIT`] by default.
    pub external_data_over: usize,
}

/// What an export produced.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The manifest written.
    pub manifest: ExportManifest,
    /// Graph nodes.
    pub nodes: usize,
    /// Files in the folder.
    pub files: Vec<String>,
    /// The check, if it ran.
    pub verify: Option<verify::VerifyReport>,
}

/// Runs an export: graph, tokenizer files and manifest into a temp folder, the optional check
/// on that folder, then one rename into place.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    if opts.out.exists() && !opts.overwrite {
        return Err(Error::Usage(format!(
            "{} exists; pass --overwrite to replace it",
            opts.out.display()
        )));
    }
    let ckpt = Checkpoint::open(&opts.model)?;
    let config = ckpt.config.clone();
    let tok = match &opts.tokenizer {
        Some(p) => gram_core::GramTokenizer::from_path(p)?,
        None => ckpt.tokenizer()?,
    };
    let labels = LabelIds::resolve(&tok)?;
    let style = match opts.style {
        Some(s) => Templates::new(&tok, s)?.style(),
        None => Templates::auto(&tok).style(),
    };
    let max_tokens = opts.max_tokens.unwrap_or(config.max_position_embeddings);
    if max_tokens == 0 || max_tokens > config.max_position_embeddings {
        return Err(Error::Usage(format!(
            "--max-tokens {max_tokens}: the model's context is {} tokens",
            config.max_position_embeddings
        )));
    }
    let weights = ckpt.weights()?;
    let inv_freq =
        gram_model::rope::inv_freq(config.head_dim, config.rope_theta, &config.rope_scaling);
    let head = match opts.head {
        HeadKind::Judge => Head::Judge(vec![labels.a, labels.b]),
        HeadKind::Lm => Head::Lm,
    };
    let graph = decoder::build(&config, &weights.tensors, &inv_freq, &head)?;
    let nodes = graph.num_nodes();

    let parent = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::File {
        path: parent.to_path_buf(),
        msg: e.to_string(),
    })?;
    let name = opts
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::File {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    let result = (|| -> Result<ExportReport> {
        let source = std::fs::canonicalize(&opts.model).unwrap_or_else(|_| opts.model.clone());
        let meta = [
            ("gram.head", format!("{:?}", opts.head).to_lowercase()),
            ("gram.source", source.display().to_string()),
            ("gram.label_ids", format!("{},{}", labels.a, labels.b)),
        ];
        let doc = format!(
            "GRAM {} exported by gram-export from {}",
            config.architecture.model_type(),
            source.display()
        );
        let mut files = graph
            .write(&tmp, "model.onnx", &meta, &doc, opts.external_data_over)
            .map_err(|e| Error::File {
                path: tmp.join("model.onnx"),
                msg: e.to_string(),
            })?;
        drop(weights);
        tok.save_dir(&tmp)?;
        let mut manifest = ExportManifest {
            format_version: FORMAT_VERSION,
            model_file: "model.onnx".into(),
            head: opts.head,
            inputs: vec!["input_ids".into(), "attention_mask".into()],
            output: match opts.head {
                HeadKind::Judge => "judge_logits".into(),
                HeadKind::Lm => "logits".into(),
            },
            prompt_style: style,
            label_ids: labels,
            max_tokens,
            pad_id: tok.pad_id(),
            opset: graph::OPSET,
            architecture: config.architecture.model_type().into(),
            num_parameters: config.num_parameters(),
            source,
            tokenizer_fingerprint: tok.fingerprint(),
            verified_max_abs_diff: None,
        };
        let write_manifest = |m: &ExportManifest| -> Result<()> {
            let bytes = serde_json::to_vec_pretty(m).map_err(|e| Error::Usage(e.to_string()))?;
            Ok(gram_core::atomic_write(&tmp.join(MANIFEST), &bytes)?)
        };
        write_manifest(&manifest)?;
        let verify = if opts.verify {
            let r = verify::verify(&ckpt, &tok, &tmp, &manifest, opts.tolerance)?;
            manifest.verified_max_abs_diff = Some(r.max_abs_diff);
            write_manifest(&manifest)?;
            Some(r)
        } else {
            None
        };
        files.push(MANIFEST.into());
        let mut all: Vec<String> = std::fs::read_dir(&tmp)
            .map_err(|e| Error::File {
                path: tmp.clone(),
                msg: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        all.sort();
        let files = all;
        Ok(ExportReport {
            manifest,
            nodes,
            files,
            verify,
        })
    })();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if opts.out.exists() {
        std::fs::remove_dir_all(&opts.out).map_err(|e| Error::File {
            path: opts.out.clone(),
            msg: e.to_string(),
        })?;
    }
    std::fs::rename(&tmp, &opts.out).map_err(|e| Error::File {
        path: opts.out.clone(),
        msg: e.to_string(),
    })?;
    Ok(report)
}
