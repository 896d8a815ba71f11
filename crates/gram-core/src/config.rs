//! Model configuration: HF `config.json` (both the legacy `rope_theta` + `rope_scaling` form and
//! transformers 5's `rope_parameters` form) mirrored in serde and turned into [`ModelConfig`], the
//! one runtime description every crate shares (as candle's `LlamaConfig::into_config` does).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// The decoder families GRAM-rs implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// LLaMA 1/2/3 and every checkpoint of the same shape (SmolLM2, TinyLlama, ...).
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: RMS norms on q and k per head, `head_dim` apart from hidden / heads.
    Qwen3,
}

impl Architecture {
    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// The HF `architectures[0]` class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Rotary embedding frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// LLaMA 3.1's smooth frequency-band scaling.
    Llama3 {
        /// Scale of the low-frequency band.
        factor: f32,
        /// Lower edge of the smoothing band.
        low_freq_factor: f32,
        /// Upper edge of the smoothing band.
        high_freq_factor: f32,
        /// The context length the model was first trained at.
        original_max_position_embeddings: usize,
    },
}

/// The largest size of any one dimension a configuration may give (16M: vocabularies, widths
/// and contexts of real models are far below it); past it, a config is taken as corrupt.
pub const MAX_SIZE: usize = 1 << 24;

/// The largest parameter count a configuration may describe (about 1.1 trillion).
pub const MAX_PARAMETERS: u128 = 1 << 40;

/// Everything the model needs to know about a checkpoint's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads, MQA when 1).
    pub num_key_value_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Epsilon of every RMS norm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (Qwen2; LLaMA's `attention_bias` also on o).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (LLaMA `attention_bias`).
    pub o_bias: bool,
    /// Biases in the MLP (LLaMA `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMS norms on q and k (Qwen3).
    pub qk_norm: bool,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, if the config names one.
    pub eos_token_id: Option<u32>,
    /// The dtype the checkpoint was saved in (informative).
    pub dtype: String,
}

impl ModelConfig {
    /// Parameter count implied by the shapes.
    pub fn num_parameters(&self) -> usize {
        usize::try_from(self.parameter_count()).unwrap_or(usize::MAX)
    }

    /// [`Self::num_parameters`] in u128, which no configuration [`Self::validate`] passes can
    /// overflow (every size is at most [`MAX_SIZE`]).
    fn parameter_count(&self) -> u128 {
        let n = |x: usize| x as u128;
        let (h, i, v) = (
            n(self.hidden_size),
            n(self.intermediate_size),
            n(self.vocab_size),
        );
        let q = n(self.num_attention_heads) * n(self.head_dim);
        let kv = n(self.num_key_value_heads) * n(self.head_dim);
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        if self.qk_norm {
            attn += 2 * n(self.head_dim);
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + n(self.num_hidden_layers) * layer + h + head
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::format(path, msg));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be > 0".into());
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("num_attention_heads and num_key_value_heads must be > 0".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim must be even and > 0, got {}",
                self.head_dim
            ));
        }
        for (name, size) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if size > MAX_SIZE {
                return bad(format!(
                    "{name} {size} is past the largest size loaded ({MAX_SIZE})"
                ));
            }
        }
        let count = self.parameter_count();
        if count > MAX_PARAMETERS {
            return bad(format!(
                "the sizes describe {count} parameters, past the largest model loaded ({MAX_PARAMETERS})"
            ));
        }
        Ok(())
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let bytes = crate::error::read_file(path)?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_json(&value, path)
    }

    /// Converts a parsed HF `config.json`; `path` names it in errors.
    pub fn from_hf_json(value: &Value, path: &Path) -> Result<Self> {
        let hf: HfConfig = serde_json::from_value(value.clone())
            .map_err(|e| Error::format(path, format!("config.json: {e}")))?;
        hf.into_config(path)
    }

    /// The HF `config.json` of this configuration, in the legacy rope form most tools read.
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        });
        let obj = v.as_object_mut().expect("json! object");
        match &self.rope_scaling {
            RopeScaling::Default => {}
            other => {
                obj.insert(
                    "rope_scaling".into(),
                    serde_json::to_value(other).unwrap_or(Value::Null),
                );
            }
        }
        match self.architecture {
            Architecture::Llama => {
                obj.insert("attention_bias".into(), self.o_bias.into());
                obj.insert("mlp_bias".into(), self.mlp_bias.into());
            }
            Architecture::Qwen2 => {
                obj.insert("use_sliding_window".into(), false.into());
            }
            Architecture::Qwen3 => {
                obj.insert("attention_bias".into(), self.qkv_bias.into());
                obj.insert("use_sliding_window".into(), false.into());
            }
        }
        v
    }
}

/// HF `config.json`, the fields GRAM-rs reads. Unknown fields are kept in `rest` and checked
/// against the list of those that would change the computation.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
    quantization_config: Option<Value>,
    pretraining_tp: Option<usize>,
}

fn first_id(v: &Option<Value>) -> Option<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        Some(Value::Array(a)) => a
            .first()
            .and_then(Value::as_u64)
            .and_then(|x| u32::try_from(x).ok()),
        _ => None,
    }
}

impl HfConfig {
    fn into_config(self, path: &Path) -> Result<ModelConfig> {
        let model_type = self
            .model_type
            .clone()
            .or_else(|| {
                self.architectures
                    .as_ref()
                    .and_then(|a| a.first())
                    .map(|s| s.to_lowercase())
            })
            .unwrap_or_default();
        let architecture = match model_type.as_str() {
            "llama" | "llamaforcausallm" | "mistral" => Architecture::Llama,
            "qwen2" | "qwen2forcausallm" => Architecture::Qwen2,
            "qwen3" | "qwen3forcausallm" => Architecture::Qwen3,
            other => {
                return Err(Error::unsupported(
                    path,
                    "model_type",
                    format!("`{other}` (supported: llama, qwen2, qwen3)"),
                ));
            }
        };
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(Error::unsupported(
                path,
                "hidden_act",
                format!("`{act}` (supported: silu)"),
            ));
        }
        if self.quantization_config.is_some() {
            return Err(Error::unsupported(
                path,
                "quantization_config",
                "quantised HF checkpoints are not read; use the float weights or a GGUF",
            ));
        }
        if self.use_sliding_window == Some(true) {
            return Err(Error::unsupported(
                path,
                "use_sliding_window",
                "sliding-window attention is not implemented",
            ));
        }
        if let Some(types) = &self.layer_types
            && let Some(t) = types.iter().find(|t| t.as_str() != "full_attention")
        {
            return Err(Error::unsupported(
                path,
                "layer_types",
                format!("`{t}` (supported: full_attention)"),
            ));
        }
        if self.pretraining_tp.unwrap_or(1) == 0 {
            return Err(Error::format(path, "pretraining_tp must be >= 1"));
        }
        if model_type == "mistral" {
            // Mistral shares LLaMA's shape but may use sliding windows; accepted only without one.
        }

        // Rope: transformers 5 nests everything under `rope_parameters`; older configs use a
        // top-level `rope_theta` and an optional `rope_scaling`.
        let (theta, scaling) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(rp), _) => {
                let theta = rp
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .map(|x| x as f32)
                    .or(self.rope_theta);
                (theta, Some(rp.clone()))
            }
            (None, rs) => (self.rope_theta, rs.clone()),
        };
        let rope_theta = theta.unwrap_or(10_000.0);
        let rope_scaling = parse_rope_scaling(scaling.as_ref(), path)?;

        let num_attention_heads = self.num_attention_heads;
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if num_attention_heads > 0 => self.hidden_size / num_attention_heads,
            None => 0,
        };
        let (qkv_bias, o_bias, qk_norm) = match architecture {
            Architecture::Llama => {
                let b = self.attention_bias.unwrap_or(false);
                (b, b, false)
            }
            Architecture::Qwen2 => (true, false, false),
            Architecture::Qwen3 => (
                self.attention_bias.unwrap_or(false),
                self.attention_bias.unwrap_or(false),
                true,
            ),
        };
        let tie_default = matches!(architecture, Architecture::Qwen2);
        let cfg = ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(tie_default),
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            qk_norm,
            bos_token_id: first_id(&self.bos_token_id),
            eos_token_id: first_id(&self.eos_token_id),
            dtype: self
                .dtype
                .or(self.torch_dtype)
                .unwrap_or_else(|| "float32".into()),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

/// Parses a rope scaling object (`rope_scaling` or `rope_parameters`).
pub fn parse_rope_scaling(v: Option<&Value>, path: &Path) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::Default);
    };
    if v.is_null() {
        return Ok(RopeScaling::Default);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f32> {
        v.get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| {
                Error::format(path, format!("rope scaling `{kind}` needs a number `{k}`"))
            })
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => Err(Error::unsupported(
            path,
            "rope_type",
            format!("`{other}` (supported: default, linear, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&v, Path::new("config.json"))
    }

    fn base() -> Value {
        serde_json::json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
    }

    #[test]
    fn both_rope_forms_read() -> Result<()> {
        let mut legacy = base();
        legacy["rope_theta"] = 500000.0.into();
        legacy["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
        let mut new = base();
        new["rope_parameters"] = serde_json::json!({"rope_theta": 500000.0, "rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16});
        let (a, b) = (parse(legacy)?, parse(new)?);
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { .. }));
        Ok(())
    }

    #[test]
    fn unsupported_things_are_named() {
        let mut v = base();
        v["model_type"] = "gpt2".into();
        let e = parse(v).expect_err("gpt2 is refused").to_string();
        assert!(e.contains("model_type") && e.contains("gpt2"), "{e}");
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let e = parse(v).expect_err("yarn is refused").to_string();
        assert!(e.contains("yarn"), "{e}");
        let mut v = base();
        v["hidden_act"] = "gelu".into();
        assert!(
            parse(v)
                .expect_err("gelu is refused")
                .to_string()
                .contains("hidden_act")
        );
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        assert!(
            parse(v)
                .expect_err("8 heads over 3 kv heads is refused")
                .to_string()
                .contains("multiple")
        );
    }

    #[test]
    fn round_trips_through_hf_json() -> Result<()> {
        let mut v = base();
        v["num_key_value_heads"] = 1.into();
        let a = parse(v)?;
        let b = parse(a.to_hf_json())?;
        assert_eq!(a.num_parameters(), b.num_parameters());
        assert_eq!(a.num_key_value_heads, 1);
        Ok(())
    }
}
