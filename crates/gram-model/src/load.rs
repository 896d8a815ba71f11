//! Checkpoint import: f32 tensors by HF name (from gram-core's safetensors and GGUF readers)
//! checked against the shapes the config implies, renamed onto module paths by one table
//! ([`HF_TO_BURN`]), and applied with burn-store (which transposes PyTorch linear weights).

use std::collections::BTreeMap;

use burn::prelude::*;
use burn::store::{
    BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, burn_pack,
};
use burn::tensor::{Bytes, DType};
use gram_core::{Checkpoint, F32Tensor, ModelConfig, Weights};

use crate::error::{Error, Result};
use crate::model::CausalLm;

/// HF tensor name -> module path. Module fields carry HF's names, so only the RMS norms differ
/// (burn calls their scale `gamma`) and the decoder's projections (their linear map sits under
/// `base`, beside an optional LoRA adapter).
pub const HF_TO_BURN: &[(&str, &str)] = &[
    (r"^(.*norm)\.weight$", "$1.gamma"),
    (r"^(.*_proj)\.(weight|bias)$", "$1.base.$2"),
];

/// The inverse of [`HF_TO_BURN`], for saving in the HF layout.
pub const BURN_TO_HF: &[(&str, &str)] = &[
    (r"^(.*norm)\.gamma$", "$1.weight"),
    (r"^(.*_proj)\.base\.(weight|bias)$", "$1.$2"),
];

/// Module paths of LoRA factors (saved in the adapter's layout by [`crate::lora`], never
/// among the HF tensors).
const LORA_PATH: &str = ".lora.";

/// Burn parameter ids by HF tensor name. The optimiser keys its state by these ids, so a resumed
/// run loads its weights under the ids they had when the optimiser state was saved.
pub type ParamIds = BTreeMap<String, u64>;

/// The tensors, by HF name, that a checkpoint of this configuration must hold, with their shapes.
pub fn expected_shapes(c: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, i, v, d) = (c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    if !c.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), vec![v, h]);
    }
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut put = |name: &str, shape: Vec<usize>| {
            m.insert(format!("{p}.{name}"), shape);
        };
        put("self_attn.q_proj.weight", vec![q, h]);
        put("self_attn.k_proj.weight", vec![kv, h]);
        put("self_attn.v_proj.weight", vec![kv, h]);
        put("self_attn.o_proj.weight", vec![h, q]);
        if c.qkv_bias {
            put("self_attn.q_proj.bias", vec![q]);
            put("self_attn.k_proj.bias", vec![kv]);
            put("self_attn.v_proj.bias", vec![kv]);
        }
        if c.o_bias {
            put("self_attn.o_proj.bias", vec![h]);
        }
        if c.qk_norm {
            put("self_attn.q_norm.weight", vec![d]);
            put("self_attn.k_norm.weight", vec![d]);
        }
        put("mlp.gate_proj.weight", vec![i, h]);
        put("mlp.up_proj.weight", vec![i, h]);
        put("mlp.down_proj.weight", vec![h, i]);
        if c.mlp_bias {
            put("mlp.gate_proj.bias", vec![i]);
            put("mlp.up_proj.bias", vec![i]);
            put("mlp.down_proj.bias", vec![h]);
        }
        put("input_layernorm.weight", vec![h]);
        put("post_attention_layernorm.weight", vec![h]);
    }
    m
}

/// Tensors a checkpoint may carry that the model does not use.
fn ignorable(name: &str, c: &ModelConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (c.tie_word_embeddings && name == "lm_head.weight")
}

/// Builds the model a checkpoint describes and loads its weights.
pub fn load(ckpt: &Checkpoint, device: &Device) -> Result<CausalLm> {
    let weights = ckpt.weights()?;
    from_weights(
        &ckpt.config,
        weights,
        &ckpt.path.display().to_string(),
        device,
    )
}

/// Builds a model of `config` from f32 tensors by HF name; `origin` names them in errors.
pub fn from_weights(
    config: &ModelConfig,
    weights: Weights,
    origin: &str,
    device: &Device,
) -> Result<CausalLm> {
    from_weights_with_ids(config, weights, None, origin, device)
}

/// [`from_weights`], giving each parameter the id it had when saved (see [`ParamIds`]).
pub fn from_weights_with_ids(
    config: &ModelConfig,
    weights: Weights,
    ids: Option<&ParamIds>,
    origin: &str,
    device: &Device,
) -> Result<CausalLm> {
    let expected = expected_shapes(config);
    let werr = |msg: String| Error::Weights {
        path: origin.to_string(),
        msg,
    };
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !weights.tensors.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
        return Err(werr(format!(
            "{} tensor(s) the config implies are missing, e.g. {}",
            missing.len(),
            shown.join(", ")
        )));
    }
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, t) in weights.tensors {
        let Some(shape) = expected.get(&name) else {
            if ignorable(&name, config) {
                continue;
            }
            return Err(werr(format!(
                "tensor `{name}` is not part of a {:?} model of this config",
                config.architecture
            )));
        };
        if &t.shape != shape {
            return Err(Error::Core(gram_core::Error::Shape {
                path: origin.into(),
                name,
                expected: shape.clone(),
                got: t.shape,
            }));
        }
        if let Some(bad) = t.data.iter().position(|x| !x.is_finite()) {
            return Err(werr(format!(
                "tensor `{name}` holds a non-finite value at index {bad}"
            )));
        }
        let id = ids.and_then(|m| m.get(&name).copied());
        tensors.push(burn_pack::Tensor::new(
            name,
            DType::F32,
            t.shape,
            id,
            Bytes::from_elems(t.data),
        ));
    }
    let remapper = KeyRemapper::from_patterns(HF_TO_BURN.to_vec())
        .map_err(|e| Error::Internal(e.to_string()))?;
    let (tensors, _) = remapper.remap(tensors);

    let mut model = CausalLm::init(config, device);
    let result = model.apply(tensors, None, Some(Box::new(PyTorchToBurnAdapter)), false);
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(werr(format!(
            "weights did not map onto the model:\n{result}"
        )));
    }
    Ok(model)
}

/// A module's parameters by HF name, in PyTorch layout (linear weights transposed back), f32,
/// with their burn parameter ids: what an HF `model.safetensors` holds (LoRA factors, which it
/// does not hold, are left out).
pub fn hf_tensors<M: ModuleSnapshot>(module: &M) -> Result<BTreeMap<String, (F32Tensor, u64)>> {
    let tensors = module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false);
    let remapper = KeyRemapper::from_patterns(BURN_TO_HF.to_vec())
        .map_err(|e| Error::Internal(e.to_string()))?;
    let (tensors, _) = remapper.remap(tensors);
    let mut out = BTreeMap::new();
    for t in tensors {
        if t.name.contains(LORA_PATH) {
            continue;
        }
        let (name, dtype, shape, id, bytes) =
            t.into_parts().map_err(|e| Error::Internal(e.to_string()))?;
        if dtype != DType::F32 {
            return Err(Error::Internal(format!(
                "parameter `{name}` is {dtype:?}, expected f32"
            )));
        }
        let data: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let id = id.ok_or_else(|| Error::Internal(format!("parameter `{name}` has no id")))?;
        out.insert(
            name,
            (
                F32Tensor {
                    shape: shape.to_vec(),
                    data,
                },
                id,
            ),
        );
    }
    Ok(out)
}
