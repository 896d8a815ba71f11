//! The description of an exported ONNX model that `gram-export onnx` writes beside the graph
//! (`gram-export.json`) and `gram-score` reads: which head the graph has, how to build its
//! inputs (prompt style, label tokens, padding, length limit) and where it came from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, read_file};
use crate::{LabelIds, PromptStyle};

/// File name of the manifest inside an export folder.
pub const MANIFEST: &str = "gram-export.json";
/// The manifest format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// What the graph outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// `judge_logits` `[batch, 2]`: the logits of `A` and `B` at the last position.
    Judge,
    /// `logits` `[batch, seq, vocab]`.
    Lm,
    /// `rewards` `[batch, 1]`: a Bradley-Terry reward model's scalar at the last position.
    Reward,
}

/// `gram-export.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportManifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The graph file, relative to the folder.
    pub model_file: String,
    /// The head.
    pub head: HeadKind,
    /// Graph input names (`input_ids`, `attention_mask`: int64 `[batch, sequence]`, left padding;
    /// a pair graph reads `shared_ids`, `shared_mask` first, see [`Self::reads_pairs`]).
    pub inputs: Vec<String>,
    /// Graph output name.
    pub output: String,
    /// How judge prompts are wrapped.
    pub prompt_style: PromptStyle,
    /// The label tokens.
    pub label_ids: LabelIds,
    /// Longest sequence a scorer may feed (texts are cut to fit, never the template).
    pub max_tokens: usize,
    /// Id used for padding (its value does not matter: masked).
    pub pad_id: u32,
    /// ONNX operator set.
    pub opset: i64,
    /// Model family (`llama`, `qwen2`, `qwen3`).
    pub architecture: String,
    /// Parameter count.
    pub num_parameters: usize,
    /// The checkpoint exported.
    pub source: PathBuf,
    /// Fingerprint of the tokenizer saved beside the graph.
    pub tokenizer_fingerprint: String,
    /// Token ids every judge prompt starts with, whose keys and values are inside the graph: the
    /// graph's inputs are the tokens after them (None: inputs are whole sequences).
    #[serde(default)]
    pub prefix_tokens: Option<Vec<u32>>,
    /// The largest difference onnxruntime showed against burn in `--verify`, if it ran.
    pub verified_max_abs_diff: Option<f32>,
}

impl ExportManifest {
    /// Reads `dir/gram-export.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        if !path.exists() {
            return Err(Error::format(
                dir,
                format!(
                    "not a gram-export folder: no {MANIFEST} (make one with `gram-export onnx`)"
                ),
            ));
        }
        let m: Self = serde_json::from_slice(&read_file(&path)?)
            .map_err(|e| Error::format(&path, e.to_string()))?;
        if m.format_version != FORMAT_VERSION {
            return Err(Error::format(
                &path,
                format!(
                    "format_version {} (this build reads {FORMAT_VERSION}); re-export the model",
                    m.format_version
                ),
            ));
        }
        Ok(m)
    }

    /// Whether the graph reads pairs (gram-export's default judge graph): each pair's tokens
    /// common to both orders as `shared_ids`/`shared_mask` `[pairs, shared]`, each order's
    /// remaining tokens as `input_ids`/`attention_mask` `[2 x pairs, sequence]`.
    pub fn reads_pairs(&self) -> bool {
        self.inputs.iter().any(|i| i == "shared_ids")
    }
}
