//! gram-export: compiles a checkpoint the model core loads (HF folder, GGUF, a gram-train
//! output) into an ONNX graph (opset 23, dynamic batch and sequence axes, left padding), with
//! the tokenizer files and `gram-export.json` beside it, and checks onnxruntime against burn.
//!
//! Burn has no ONNX export, so the graph is emitted here from the configuration and the weights
//! ([`decoder`]); the parity check ([`verify`]) is what shows it computes the same function.

pub mod decoder;
pub mod graph;
pub mod package;
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
            Self::Model(e) => e.is_user_error(),
            Self::Score(e) => e.is_user_error(),
            Self::Verify(_) => false,
            _ => true,
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Checkpoint: HF folder, GGUF file, or a LoRA adapter folder (PEFT layout; merged into its
    /// base before export).
    pub model: PathBuf,
    /// The base model of an adapter folder, instead of the one its `base_model_name_or_path`
    /// names.
    pub base: Option<PathBuf>,
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
    /// Judge head: precompute the judge template's prefix (the part before the question) into
    /// the graph, so each sequence runs only its own tokens.
    pub prefix: bool,
    /// Judge head: a pair graph (each pair's tokens common to both orders run once; see
    /// [`Head::PairJudge`]) instead of one sequence per row.
    pub pairs: bool,
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

/// The keys and values of the judge prefix, computed by onnxruntime on a graph that outputs
/// them (the same builder, so the same arithmetic). None when the tokenizer gives no fixed prefix
/// or the prefix would not leave room for the texts.
fn judge_prefix(
    config: &gram_core::ModelConfig,
    weights: &gram_core::Weights,
    inv_freq: &[f32],
    tok: &gram_core::GramTokenizer,
    style: PromptStyle,
    max_tokens: usize,
    tmp: &Path,
) -> Result<Option<decoder::PrefixKv>> {
    let enc = gram_core::fit::Tokenizer::new(tok, Templates::new(tok, style)?, max_tokens)?;
    let Some(ids) = enc.judge_prefix_ids().map(<[u32]>::to_vec) else {
        return Ok(None);
    };
    if ids.is_empty()
        || ids.len() * 2 > max_tokens
        || ids.iter().any(|&i| i as usize >= config.vocab_size)
    {
        return Ok(None);
    }
    let graph = decoder::build(config, &weights.tensors, inv_freq, &Head::KeyValues, None)?;
    let path = tmp.join("prefix-kv.onnx");
    graph
        .write(
            tmp,
            "prefix-kv.onnx",
            &[],
            "judge prefix keys and values",
            usize::MAX,
        )
        .map_err(|e| Error::File {
            path: path.clone(),
            msg: e.to_string(),
        })?;
    let mut session = gram_score::runtime::open_session(&path, gram_core::cli::threads())?;
    let n = ids.len();
    let batch = gram_score::runtime::Batch {
        rows: 1,
        width: n,
        ids: ids.iter().map(|&i| i64::from(i)).collect(),
        mask: vec![1; n],
    };
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut outputs = batch.run_all(&mut session)?;
    for l in 0..config.num_hidden_layers {
        let mut get = |name: String| -> Result<Vec<f32>> {
            outputs
                .remove(&name)
                .map(|(_, v)| v)
                .ok_or_else(|| Error::Verify(format!("prefix graph lacks `{name}`")))
        };
        keys.push(get(format!("key_{l}"))?);
        values.push(get(format!("value_{l}"))?);
    }
    drop(session);
    std::fs::remove_file(&path).map_err(|e| Error::File {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    Ok(Some(decoder::PrefixKv { ids, keys, values }))
}

/// Runs an export: graph, tokenizer files and manifest into a temp folder, the optional check
/// on that folder, then one rename into place.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    check_out(&opts.out, opts.overwrite)?;
    let plan = Plan::resolve(opts)?;
    let weights = plan.ckpt.weights()?;
    let config = &plan.ckpt.config;
    let inv_freq =
        gram_model::rope::inv_freq(config.head_dim, config.rope_theta, &config.rope_scaling);
    publish_dir(&opts.out, opts.overwrite, |tmp| {
        let (tok, style, max_tokens) = (&plan.tok, plan.style, plan.max_tokens);
        let prefix = match opts.head {
            HeadKind::Judge if opts.prefix => {
                judge_prefix(config, &weights, &inv_freq, tok, style, max_tokens, tmp)?
            }
            _ => None,
        };
        let graph = decoder::build(
            config,
            &weights.tensors,
            &inv_freq,
            &plan.head,
            prefix.as_ref(),
        )?;
        let nodes = graph.num_nodes();
        let source = std::fs::canonicalize(&opts.model).unwrap_or_else(|_| opts.model.clone());
        let (a, b) = (plan.labels.a, plan.labels.b);
        let meta = [
            ("gram.head", format!("{:?}", opts.head).to_lowercase()),
            ("gram.source", source.display().to_string()),
            ("gram.label_ids", format!("{a},{b}")),
        ];
        let doc = format!(
            "GRAM {} exported by gram-export from {}",
            config.architecture.model_type(),
            source.display()
        );
        graph
            .write(tmp, "model.onnx", &meta, &doc, opts.external_data_over)
            .map_err(|e| Error::File {
                path: tmp.join("model.onnx"),
                msg: e.to_string(),
            })?;
        drop(weights);
        tok.save_dir(tmp)?;
        let mut manifest = plan.manifest(opts.head, source, prefix.as_ref());
        write_manifest(tmp, &manifest)?;
        let verify = if opts.verify {
            let r = verify::verify(&plan.ckpt, tok, tmp, &manifest, opts.tolerance)?;
            manifest.verified_max_abs_diff = Some(r.max_abs_diff);
            write_manifest(tmp, &manifest)?;
            Some(r)
        } else {
            None
        };
        Ok(ExportReport {
            manifest,
            nodes,
            files: list_files(tmp)?,
            verify,
        })
    })
}

/// What an export reads, resolved and checked before anything is computed or written.
struct Plan {
    ckpt: Checkpoint,
    tok: gram_core::GramTokenizer,
    labels: LabelIds,
    style: PromptStyle,
    max_tokens: usize,
    head: Head,
}

impl Plan {
    fn resolve(opts: &ExportOptions) -> Result<Self> {
        let ckpt = Checkpoint::open_with_base(&opts.model, opts.base.as_deref())?;
        let tok = match &opts.tokenizer {
            Some(p) => gram_core::GramTokenizer::from_path(p)?,
            None => ckpt.tokenizer()?,
        };
        let labels = LabelIds::resolve(&tok)?;
        let style = match opts.style {
            Some(s) => Templates::new(&tok, s)?.style(),
            None => Templates::auto(&tok).style(),
        };
        let context = ckpt.config.max_position_embeddings;
        let max_tokens = opts.max_tokens.unwrap_or(context);
        if max_tokens == 0 || max_tokens > context {
            return Err(Error::Usage(format!(
                "--max-tokens {max_tokens}: the model's context is {context} tokens"
            )));
        }
        let head = match opts.head {
            HeadKind::Judge if opts.pairs => Head::PairJudge(vec![labels.a, labels.b]),
            HeadKind::Judge => Head::Judge(vec![labels.a, labels.b]),
            HeadKind::Lm => Head::Lm,
            HeadKind::Reward => Head::Reward,
        };
        Ok(Self {
            ckpt,
            tok,
            labels,
            style,
            max_tokens,
            head,
        })
    }

    /// The manifest of the graph this plan builds (not yet verified).
    fn manifest(
        &self,
        kind: HeadKind,
        source: PathBuf,
        prefix: Option<&decoder::PrefixKv>,
    ) -> ExportManifest {
        let config = &self.ckpt.config;
        let inputs: &[&str] = match self.head {
            Head::PairJudge(_) => &["shared_ids", "shared_mask", "input_ids", "attention_mask"],
            _ => &["input_ids", "attention_mask"],
        };
        ExportManifest {
            format_version: FORMAT_VERSION,
            model_file: "model.onnx".into(),
            head: kind,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            output: match kind {
                HeadKind::Judge => "judge_logits".into(),
                HeadKind::Lm => "logits".into(),
                HeadKind::Reward => "rewards".into(),
            },
            prompt_style: self.style,
            label_ids: self.labels,
            max_tokens: self.max_tokens,
            pad_id: self.tok.pad_id(),
            opset: graph::OPSET,
            architecture: config.architecture.model_type().into(),
            num_parameters: config.num_parameters(),
            source,
            tokenizer_fingerprint: self.tok.fingerprint(),
            prefix_tokens: prefix.map(|p| p.ids.clone()),
            verified_max_abs_diff: None,
        }
    }
}

fn write_manifest(dir: &Path, m: &ExportManifest) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| Error::Usage(e.to_string()))?;
    Ok(gram_core::atomic_write(&dir.join(MANIFEST), &bytes)?)
}

/// The names of the files in `dir`, sorted.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut all: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::File {
            path: dir.to_path_buf(),
            msg: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    all.sort();
    Ok(all)
}

/// Refuses an existing `out` unless `overwrite` (checked before any work).
fn check_out(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && !overwrite {
        return Err(Error::Usage(format!(
            "{} exists; pass --overwrite to replace it",
            out.display()
        )));
    }
    Ok(())
}

/// `fill` builds the folder `out` (see [`gram_core::publish_dir`]) unless it exists without
/// `--overwrite`.
fn publish_dir<T>(out: &Path, overwrite: bool, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    check_out(out, overwrite)?;
    gram_core::publish_dir(out, fill)
}
