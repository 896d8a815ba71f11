//! The discriminative baseline: a decoder with a scalar head on the last real token (HF's
//! `*ForSequenceClassification` with one label), trained with the Bradley-Terry loss. Its
//! parameters carry HF's names (`model.*`, `score.weight`), so it saves in HF's layout.

use burn::module::{Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use gram_core::{ModelConfig, Weights};

use crate::error::{Error, Result};
use crate::load::{ParamIds, from_weights_with_ids};
use crate::model::Decoder;

/// HF name of the scalar head's weight (`[1, hidden]` in PyTorch layout).
pub const SCORE_WEIGHT: &str = "score.weight";

/// A decoder and a scalar reward head.
#[derive(Module, Debug)]
pub struct RewardModel {
    /// The decoder (HF's `model.*`).
    pub model: Decoder,
    /// `hidden -> 1`, no bias (HF's `score`).
    pub score: Linear,
    /// RoPE inverse frequencies.
    #[module(skip)]
    pub inv_freq: Vec<f32>,
}

/// A new value head for a model of hidden size `hidden`: `score.weight` `[1, hidden]` drawn
/// N(0, 0.02) on the host from `seed`, so the CPU and wgpu backends start alike.
pub fn new_head(hidden: usize, seed: u64) -> gram_core::F32Tensor {
    gram_core::F32Tensor {
        shape: vec![1, hidden],
        data: crate::host_init::normal(hidden, 0.02, seed, SCORE_WEIGHT),
    }
}

impl RewardModel {
    /// Builds the model from f32 tensors by HF name: a causal LM's (the head is then new,
    /// initialised N(0, 0.02) from the device's seed; see [`new_head`] for one that is the same
    /// on every backend) or a reward model's own. An LM head in the
    /// tensors is dropped.
    pub fn from_weights(
        config: &ModelConfig,
        mut weights: Weights,
        ids: Option<&ParamIds>,
        origin: &str,
        device: &Device,
    ) -> Result<Self> {
        let score = weights.tensors.remove(SCORE_WEIGHT);
        // Without a score head's neighbour lm_head: load as if tied, so an untied LM's head is
        // skipped and a saved reward model (which has none) is complete.
        let mut lm_config = config.clone();
        lm_config.tie_word_embeddings = true;
        let lm = from_weights_with_ids(&lm_config, weights, ids, origin, device)?;
        let h = config.hidden_size;
        let mut head = LinearConfig::new(h, 1)
            .with_bias(false)
            .with_initializer(burn::nn::Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            })
            .init(device);
        if let Some(t) = score {
            if t.shape != [1, h] {
                return Err(Error::Core(gram_core::Error::Shape {
                    path: origin.into(),
                    name: SCORE_WEIGHT.into(),
                    expected: vec![1, h],
                    got: t.shape,
                }));
            }
            // PyTorch stores [out, in] = [1, h]; burn's Linear holds [in, out] = [h, 1].
            let w = Tensor::<2>::from_data(TensorData::new(t.data, [h, 1]), device);
            let id = ids
                .and_then(|m| m.get(SCORE_WEIGHT).copied())
                .map_or_else(ParamId::new, ParamId::from);
            head.weight = Param::initialized(id, crate::device::trainable(w));
        } else if let Some(id) = ids.and_then(|m| m.get(SCORE_WEIGHT).copied()) {
            head.weight = Param::initialized(
                ParamId::from(id),
                crate::device::trainable(head.weight.val()),
            );
        }
        Ok(Self {
            model: lm.model,
            score: head,
            inv_freq: lm.inv_freq,
        })
    }

    /// One reward per row, read at the last position (left padding puts every row's last real
    /// token there).
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[batch, seq]`; output: `[batch]`
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<1> {
        let last = self
            .model
            .forward_last(self.model.embed(ids), mask, &self.inv_freq);
        let [b, _] = last.dims();
        self.score.forward(last).reshape([b])
    }
}

/// The HF `config.json` of a reward model of this configuration (`*ForSequenceClassification`,
/// one label), loadable by transformers' `AutoModelForSequenceClassification`.
pub fn reward_config_json(config: &ModelConfig, pad_token_id: u32) -> serde_json::Value {
    let mut v = config.to_hf_json();
    let class = config
        .architecture
        .hf_class()
        .replace("ForCausalLM", "ForSequenceClassification");
    if let Some(o) = v.as_object_mut() {
        o.insert("architectures".into(), serde_json::json!([class]));
        o.insert("num_labels".into(), serde_json::json!(1));
        o.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        o.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        o.insert("pad_token_id".into(), serde_json::json!(pad_token_id));
    }
    v
}
