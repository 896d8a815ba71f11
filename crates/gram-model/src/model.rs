//! The decoder: LLaMA / Qwen2 / Qwen3 in burn (config -> init -> Module -> forward). Field names
//! follow HF's so that checkpoint keys map onto module paths with one table (`crate::load`).
//! Every module has one forward, written once over [`crate::ops`], which picks the kernels.

use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use gram_core::ModelConfig;

use crate::lora::Lora;
use crate::ops::{self, CausalMask, Rope};
use crate::{recompute, rope};

/// RMSNorm through [`ops::rms_norm`].
fn norm<const D: usize>(n: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    ops::rms_norm(x, n.gamma.val(), n.epsilon)
}

/// A projection of a decoder layer: a linear map, and the low-rank update of a LoRA adapter
/// when one is attached ([`crate::lora`]). Module path `<name>.base.weight` holds HF's
/// `<name>.weight` (one rule of [`crate::load::HF_TO_BURN`]).
#[derive(Module, Debug)]
pub struct Proj {
    /// The linear map.
    pub base: Linear,
    /// The adapter, when attached.
    pub lora: Option<Lora>,
}

impl Proj {
    /// `x · W (+ b)`, plus the adapter's update.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let b = &self.base;
        match &self.lora {
            None => ops::linear(x, b.weight.val(), b.bias.as_ref().map(|b| b.val())),
            Some(l) => {
                let y = ops::linear(x.clone(), b.weight.val(), b.bias.as_ref().map(|b| b.val()));
                y + l.forward(x)
            }
        }
    }
}

impl CausalLm {
    /// A randomly initialised model of `config`'s shape (weights as HF's `initializer_range`
    /// 0.02 would give).
    pub fn init(config: &ModelConfig, device: &Device) -> Self {
        let c = config;
        let init = burn::nn::Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let linear = |i: usize, o: usize, bias: bool| {
            LinearConfig::new(i, o)
                .with_bias(bias)
                .with_initializer(init.clone())
                .init(device)
        };
        let lin = |i: usize, o: usize, bias: bool| Proj {
            base: linear(i, o, bias),
            lora: None,
        };
        let norm = |d: usize| {
            RmsNormConfig::new(d)
                .with_epsilon(c.rms_norm_eps)
                .init(device)
        };
        let (h, q, kv) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let layers = (0..c.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: lin(h, q, c.qkv_bias),
                    k_proj: lin(h, kv, c.qkv_bias),
                    v_proj: lin(h, kv, c.qkv_bias),
                    o_proj: lin(q, h, c.o_bias),
                    q_norm: c.qk_norm.then(|| norm(c.head_dim)),
                    k_norm: c.qk_norm.then(|| norm(c.head_dim)),
                },
                mlp: Mlp {
                    gate_proj: lin(h, c.intermediate_size, c.mlp_bias),
                    up_proj: lin(h, c.intermediate_size, c.mlp_bias),
                    down_proj: lin(c.intermediate_size, h, c.mlp_bias),
                },
                input_layernorm: norm(h),
                post_attention_layernorm: norm(h),
            })
            .collect();
        Self {
            model: Decoder {
                embed_tokens: EmbeddingConfig::new(c.vocab_size, h)
                    .with_initializer(init.clone())
                    .init(device),
                layers,
                norm: norm(h),
            },
            lm_head: (!c.tie_word_embeddings).then(|| linear(h, c.vocab_size, false)),
            inv_freq: rope::inv_freq(c.head_dim, c.rope_theta, &c.rope_scaling),
        }
    }
}

/// Multi-head attention with grouped key/value heads (head counts follow from the projections'
/// widths and the rotary tables' head size).
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Proj,
    /// Key projection.
    pub k_proj: Proj,
    /// Value projection.
    pub v_proj: Proj,
    /// Output projection.
    pub o_proj: Proj,
    /// Per-head query norm (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head key norm (Qwen3).
    pub k_norm: Option<RmsNorm>,
}

impl Attention {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, mask: &CausalMask) -> Tensor<3> {
        self.o_proj.forward(self.heads(x, rope, mask))
    }

    /// The heads' outputs before the output projection, `[batch, seq, heads * head_dim]`.
    fn heads(&self, x: Tensor<3>, rope: &Rope, mask: &CausalMask) -> Tensor<3> {
        let d = rope.head_dim();
        let per_head_norm = |y: Tensor<3>, n: &Option<RmsNorm>| match n {
            Some(n) => {
                let [b, t, w] = y.dims();
                norm(n, y.reshape([b, t, w / d, d])).reshape([b, t, w])
            }
            None => y,
        };
        let q = per_head_norm(self.q_proj.forward(x.clone()), &self.q_norm);
        let k = per_head_norm(self.k_proj.forward(x.clone()), &self.k_norm);
        let v = self.v_proj.forward(x);
        ops::attention(q, k, v, rope, mask)
    }
}

/// The SwiGLU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate.
    pub gate_proj: Proj,
    /// Up.
    pub up_proj: Proj,
    /// Down.
    pub down_proj: Proj,
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        self.down_proj.forward(ops::swiglu(gate, up))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Attention.
    pub self_attn: Attention,
    /// MLP.
    pub mlp: Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// # Shapes
    /// `x`: `[batch, seq, hidden]` -> same.
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, mask: &CausalMask) -> Tensor<3> {
        let a = self
            .self_attn
            .forward(norm(&self.input_layernorm, x.clone()), rope, mask);
        self.mlp_block(x + a)
    }

    /// The layer's output at the last position only, `[batch, hidden]`: attention still reads
    /// every position's keys and values, but the output projection, the second norm and the
    /// MLP run on one row per sequence. What a last layer needs when only the last position is
    /// read (the judge's label logits, a reward head), and the same values as the full layer's
    /// last row.
    fn forward_last(&self, x: Tensor<3>, rope: &Rope, mask: &CausalMask) -> Tensor<2> {
        let heads = self
            .self_attn
            .heads(norm(&self.input_layernorm, x.clone()), rope, mask);
        self.mlp_block(last_row(x) + self.self_attn.o_proj.forward(last_row(heads)))
    }

    /// `h + mlp(norm(h))`.
    fn mlp_block<const D: usize>(&self, h: Tensor<D>) -> Tensor<D> {
        h.clone() + self.mlp.forward(norm(&self.post_attention_layernorm, h))
    }
}

/// The last position of each sequence: `[batch, seq, width]` -> `[batch, width]`.
fn last_row(y: Tensor<3>) -> Tensor<2> {
    let [b, t, w] = y.dims();
    y.slice([0..b, t - 1..t, 0..w]).reshape([b, w])
}

/// Token ids as a 1-D integer tensor.
fn token_tensor(tokens: &[u32], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(
        TensorData::new(
            tokens.iter().map(|&x| i64::from(x)).collect::<Vec<_>>(),
            [tokens.len()],
        ),
        device,
    )
}

/// Embedding, layers and final norm: HF's `model.*`. Its forward passes take the embedded
/// tokens ([`Decoder::embed`]), so that a head tied to the embedding can share the lookup.
#[derive(Module, Debug)]
pub struct Decoder {
    /// Token embedding.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
}

impl Decoder {
    /// The token embeddings, `[batch, seq]` -> `[batch, seq, hidden]`.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.embed_tokens.forward(ids)
    }

    /// Final hidden states (after the last norm), rotating by `inv_freq`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` (embedded tokens); `mask`: `[batch, seq]`, left-padded
    ///   (1 on real tokens)
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, mask: Tensor<2, Int>, inv_freq: &[f32]) -> Tensor<3> {
        let (rope, mask) = (Rope::new(mask.clone(), inv_freq), CausalMask::new(mask));
        let x = recompute::run_layers(&self.layers, x, &rope, &mask);
        norm(&self.norm, x)
    }

    /// The final hidden state at the last position only (left padding puts every row's last
    /// real token there): equal to [`Decoder::forward`]'s last row, but the last layer's output
    /// projection and MLP and the final norm run on that row alone, forward and backward.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `mask`: `[batch, seq]`, left-padded; output: `[batch, hidden]`
    pub fn forward_last(&self, x: Tensor<3>, mask: Tensor<2, Int>, inv_freq: &[f32]) -> Tensor<2> {
        let (rope, mask) = (Rope::new(mask.clone(), inv_freq), CausalMask::new(mask));
        let Some((last, below)) = self.layers.split_last() else {
            return norm(&self.norm, last_row(x));
        };
        let x = recompute::run_layers(below, x, &rope, &mask);
        norm(&self.norm, last.forward_last(x, &rope, &mask))
    }
}

/// A causal LM: the decoder and its output head (HF's `*ForCausalLM`).
#[derive(Module, Debug)]
pub struct CausalLm {
    /// The decoder.
    pub model: Decoder,
    /// Output head; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// RoPE inverse frequencies (a constant, not a parameter).
    #[module(skip)]
    pub inv_freq: Vec<f32>,
}

impl CausalLm {
    /// Final hidden states (after the last norm).
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[batch, seq]`, left-padded (mask 1 on real tokens)
    /// - output: `[batch, seq, hidden]`
    pub fn forward_hidden(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<3> {
        self.model
            .forward(self.model.embed(ids), mask, &self.inv_freq)
    }

    /// The final hidden state at the last position ([`Decoder::forward_last`]).
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[batch, seq]`, left-padded; output: `[batch, hidden]`
    pub fn last_hidden(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<2> {
        self.model
            .forward_last(self.model.embed(ids), mask, &self.inv_freq)
    }

    /// Logits of hidden-state rows through the output head.
    ///
    /// # Shapes
    /// `[n, hidden]` -> `[n, vocab]`
    pub fn head(&self, h: Tensor<2>) -> Tensor<2> {
        h.matmul(self.head_weight())
    }

    /// The output-head matrix as `[hidden, vocab]`.
    fn head_weight(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(l) => l.weight.val(),
            None => self.model.embed_tokens.weight.val().transpose(),
        }
    }

    /// Logits at every position.
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[batch, seq]`; output: `[batch, seq, vocab]`
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<3> {
        let h = self.forward_hidden(ids, mask);
        let [b, t, d] = h.dims();
        let w = self.head_weight();
        let [_, v] = w.dims();
        h.reshape([b * t, d]).matmul(w).reshape([b, t, v])
    }

    /// Logits of selected vocabulary rows at the last position (left padding puts every row's
    /// last real token there): what GRAM's judge reads, without the rest of the output head.
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[batch, seq]`; output: `[batch, token_ids.len()]`
    pub fn last_logits(
        &self,
        ids: Tensor<2, Int>,
        mask: Tensor<2, Int>,
        token_ids: &[u32],
    ) -> Tensor<2> {
        match &self.lm_head {
            // A checkpointed pass carries the embedding's gradient back separately, so the
            // rows then come from a lookup of their own.
            None if recompute::recording() => {
                let last = self.last_hidden(ids.clone(), mask);
                let rows = self
                    .model
                    .embed(token_tensor(token_ids, &ids.device()).unsqueeze());
                let [_, n, w] = rows.dims();
                last.matmul(rows.reshape([n, w]).transpose())
            }
            None => {
                let (x, rows) = self.embed_with_rows(ids, token_ids);
                let last = self.model.forward_last(x, mask, &self.inv_freq);
                last.matmul(rows.transpose())
            }
            Some(head) => {
                let last = self.last_hidden(ids, mask);
                let idx = token_tensor(token_ids, &last.device());
                last.matmul(head.weight.val().select(1, idx))
            }
        }
    }

    /// The embedded `ids` (`[batch, seq, hidden]`) and the embedding rows of `tokens`
    /// (`[tokens.len(), hidden]`) from one lookup: a head tied to the embedding then reads its
    /// rows without a second vocabulary-sized gradient (a transposed copy of the whole matrix's
    /// gradient, summed into the embedding's) in the backward pass.
    fn embed_with_rows(&self, ids: Tensor<2, Int>, tokens: &[u32]) -> (Tensor<3>, Tensor<2>) {
        let [b, t] = ids.dims();
        let n = b * t;
        let extra = token_tensor(tokens, &ids.device());
        let all = Tensor::cat(vec![ids.reshape([n]), extra], 0).reshape([1, n + tokens.len()]);
        let e = self.model.embed(all);
        let [_, _, w] = e.dims();
        let x = e.clone().slice([0..1, 0..n, 0..w]).reshape([b, t, w]);
        let rows = e
            .slice([0..1, n..n + tokens.len(), 0..w])
            .reshape([tokens.len(), w]);
        (x, rows)
    }
}
