//! The decoder: LLaMA / Qwen2 / Qwen3 in burn (Config -> init -> Module -> forward). Field names
//! follow HF's so that checkpoint keys map onto module paths with one table (`crate::load`).

use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use gram_core::{ModelConfig, RopeScaling};

use crate::{fused, rope};

/// Which implementation of attention, RMSNorm and SwiGLU a forward pass uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The fused CPU operations of [`crate::fused`] on burn's CPU backend, burn's primitives
    /// elsewhere.
    Auto,
    /// burn's primitives everywhere (the reference the fused operations are tested against).
    Composed,
}

/// What every layer's attention needs besides the hidden states.
pub struct AttnCtx {
    /// RoPE tables, `[batch, 1, seq, head_dim]`.
    cos: Tensor<4>,
    sin: Tensor<4>,
    /// How keys are hidden: a `[batch, 1, seq, seq]` mask (true = hidden) for the composed
    /// path, or the `[batch, seq]` real-token indicator for the fused one.
    mask: AttnMask,
}

enum AttnMask {
    Composed(Tensor<4, Bool>),
    Fused(Tensor<2>),
}

impl AttnCtx {
    fn fused(&self) -> bool {
        matches!(self.mask, AttnMask::Fused(_))
    }
}

/// RMSNorm through the fused CPU operation or burn's module.
fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>, fused: bool) -> Tensor<D> {
    if fused {
        fused::rms_norm(x, norm.gamma.val(), norm.epsilon)
    } else {
        norm.forward(x)
    }
}

/// A linear layer, through the fused CPU product (one gemm over all rows, backward included)
/// or burn's own.
fn project<const D: usize>(layer: &Linear, x: Tensor<D>, fused: bool) -> Tensor<D> {
    if !fused {
        return layer.forward(x);
    }
    let y = fused::linear(x, layer.weight.val());
    match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

/// Runtime configuration of [`CausalLm`], made from a checkpoint's [`ModelConfig`].
#[derive(Config, Debug)]
pub struct CausalLmConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head size.
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling (JSON of [`RopeScaling`]).
    pub rope_scaling: RopeScaling,
    /// Biases on q, k, v.
    pub qkv_bias: bool,
    /// Bias on o.
    pub o_bias: bool,
    /// Biases in the MLP.
    pub mlp_bias: bool,
    /// Per-head q/k RMS norms.
    pub qk_norm: bool,
    /// Output head tied to the embedding.
    pub tie_word_embeddings: bool,
}

impl CausalLmConfig {
    /// From a checkpoint's configuration.
    pub fn from_model_config(c: &ModelConfig) -> Self {
        Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling: c.rope_scaling.clone(),
            qkv_bias: c.qkv_bias,
            o_bias: c.o_bias,
            mlp_bias: c.mlp_bias,
            qk_norm: c.qk_norm,
            tie_word_embeddings: c.tie_word_embeddings,
        }
    }

    /// A randomly initialised model (weights as HF's `initializer_range` 0.02 would give).
    pub fn init(&self, device: &Device) -> CausalLm {
        let init = burn::nn::Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let lin = |i: usize, o: usize, bias: bool| {
            LinearConfig::new(i, o)
                .with_bias(bias)
                .with_initializer(init.clone())
                .init(device)
        };
        let norm = |d: usize| {
            RmsNormConfig::new(d)
                .with_epsilon(self.rms_norm_eps)
                .init(device)
        };
        let (h, q, kv) = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let layers = (0..self.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: lin(h, q, self.qkv_bias),
                    k_proj: lin(h, kv, self.qkv_bias),
                    v_proj: lin(h, kv, self.qkv_bias),
                    o_proj: lin(q, h, self.o_bias),
                    q_norm: self.qk_norm.then(|| norm(self.head_dim)),
                    k_norm: self.qk_norm.then(|| norm(self.head_dim)),
                    num_heads: self.num_attention_heads,
                    num_kv_heads: self.num_key_value_heads,
                    head_dim: self.head_dim,
                },
                mlp: Mlp {
                    gate_proj: lin(h, self.intermediate_size, self.mlp_bias),
                    up_proj: lin(h, self.intermediate_size, self.mlp_bias),
                    down_proj: lin(self.intermediate_size, h, self.mlp_bias),
                },
                input_layernorm: norm(h),
                post_attention_layernorm: norm(h),
            })
            .collect();
        let inv = rope::inv_freq(self.head_dim, self.rope_theta, &self.rope_scaling);
        CausalLm {
            model: Decoder {
                embed_tokens: EmbeddingConfig::new(self.vocab_size, h)
                    .with_initializer(init.clone())
                    .init(device),
                layers,
                norm: norm(h),
            },
            lm_head: (!self.tie_word_embeddings).then(|| lin(h, self.vocab_size, false)),
            inv_freq: inv,
        }
    }
}

/// Multi-head attention with grouped key/value heads.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Per-head query norm (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head key norm (Qwen3).
    pub k_norm: Option<RmsNorm>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
}

impl Attention {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, ctx: &AttnCtx) -> Tensor<3> {
        if let AttnMask::Fused(_) = &ctx.mask {
            let [b, t, w] = x.dims();
            return self
                .forward_fused(x.reshape([b * t, w]), ctx, b)
                .reshape([b, t, w]);
        }
        self.o_proj.forward(self.attend(x, ctx))
    }

    /// The heads' outputs before the output projection (composed path).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; output: `[batch, seq, heads * head_dim]`
    fn attend(&self, x: Tensor<3>, ctx: &AttnCtx) -> Tensor<3> {
        let (cos, sin) = (&ctx.cos, &ctx.sin);
        let AttnMask::Composed(masked) = &ctx.mask else {
            unreachable!("attend is only called with the composed mask")
        };
        let [b, t, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |y: Tensor<3>, n: usize, norm: &Option<RmsNorm>| {
            let y = y.reshape([b, t, n, d]);
            let y = match norm {
                Some(nm) => nm.forward(y),
                None => y,
            };
            y.swap_dims(1, 2)
        };
        let q = heads(self.q_proj.forward(x.clone()), h, &self.q_norm);
        let k = heads(self.k_proj.forward(x.clone()), kv, &self.k_norm);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, t, kv, d])
            .swap_dims(1, 2);
        let q = rope::apply(q, cos, sin);
        let k = rope::apply(k, cos, sin);
        let (k, v) = if kv == h {
            (k, v)
        } else {
            let rep = h / kv;
            let expand = |y: Tensor<4>| {
                y.unsqueeze_dim::<5>(2)
                    .repeat_dim(2, rep)
                    .reshape([b, h, t, d])
            };
            (expand(k), expand(v))
        };
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt());
        // A large finite value rather than -inf: a fully masked row (a padding query) then
        // softmaxes to a uniform row instead of NaN, and its output is never read.
        let scores = scores.mask_fill(masked.clone().expand([b, h, t, t]), -1.0e30);
        let attn = softmax(scores, 3);
        attn.matmul(v).swap_dims(1, 2).reshape([b, t, h * d])
    }

    /// The same through the fused CPU attention (no head transposes, no score tensor), on rows
    /// flattened to `[batch * seq, hidden]` so that each projection is one matrix product.
    fn forward_fused(&self, x: Tensor<2>, ctx: &AttnCtx, b: usize) -> Tensor<2> {
        project(&self.o_proj, self.attend_fused(x, ctx, b), true)
    }

    /// The heads' outputs before the output projection (fused path), `[batch * seq, heads *
    /// head_dim]`.
    fn attend_fused(&self, x: Tensor<2>, ctx: &AttnCtx, b: usize) -> Tensor<2> {
        let AttnMask::Fused(keep) = &ctx.mask else {
            unreachable!("attend_fused is only called with the fused mask")
        };
        let [n, _] = x.dims();
        let t = n / b;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let per_head = |y: Tensor<2>, heads: usize, norm: &Option<RmsNorm>| {
            let y = match norm {
                Some(nm) => rms_norm(nm, y.reshape([n, heads, d]), true).reshape([n, heads * d]),
                None => y,
            };
            y.reshape([b, t, heads * d])
        };
        let q = per_head(project(&self.q_proj, x.clone(), true), h, &self.q_norm);
        let k = per_head(project(&self.k_proj, x.clone(), true), kv, &self.k_norm);
        let v = project(&self.v_proj, x, true).reshape([b, t, kv * d]);
        let cos = ctx.cos.clone().reshape([b, t, d]);
        let sin = ctx.sin.clone().reshape([b, t, d]);
        fused::attention(q, k, v, cos, sin, keep.clone(), h, kv).reshape([n, h * d])
    }
}

/// The SwiGLU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate.
    pub gate_proj: Linear,
    /// Up.
    pub up_proj: Linear,
    /// Down.
    pub down_proj: Linear,
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>, fused: bool) -> Tensor<D> {
        let gate = project(&self.gate_proj, x.clone(), fused);
        let up = project(&self.up_proj, x, fused);
        let act = if fused {
            fused::swiglu(gate, up)
        } else {
            silu(gate) * up
        };
        project(&self.down_proj, act, fused)
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
    pub fn forward(&self, x: Tensor<3>, ctx: &AttnCtx) -> Tensor<3> {
        if ctx.fused() {
            let [b, t, w] = x.dims();
            return self
                .forward_rows(x.reshape([b * t, w]), ctx, b)
                .reshape([b, t, w]);
        }
        let f = false;
        let h = x.clone()
            + self
                .self_attn
                .forward(rms_norm(&self.input_layernorm, x, f), ctx);
        h.clone()
            + self
                .mlp
                .forward(rms_norm(&self.post_attention_layernorm, h, f), f)
    }
}

impl DecoderLayer {
    /// The fused CPU path on rows flattened to `[batch * seq, hidden]`: every linear layer is
    /// one matrix product over all rows (burn's batched product would repack the weight per
    /// batch row, and sum per-row weight gradients afterwards).
    fn forward_rows(&self, x: Tensor<2>, ctx: &AttnCtx, b: usize) -> Tensor<2> {
        let h = x.clone()
            + self
                .self_attn
                .forward_fused(rms_norm(&self.input_layernorm, x, true), ctx, b);
        h.clone()
            + self
                .mlp
                .forward(rms_norm(&self.post_attention_layernorm, h, true), true)
    }

    /// The layer's output at the last position only, `[batch, hidden]`: attention still reads
    /// every position's keys and values, but the output projection, the second norm and the
    /// MLP run on one row per sequence. What a last layer needs when only the last position is
    /// read (the judge's label logits, a reward head), and the same values as the full layer's
    /// last row.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; output: `[batch, hidden]`
    fn forward_last(&self, x: Tensor<3>, ctx: &AttnCtx) -> Tensor<2> {
        let [b, t, w] = x.dims();
        let fused = ctx.fused();
        let normed = rms_norm(&self.input_layernorm, x.clone(), fused);
        let heads = if fused {
            let heads = self
                .self_attn
                .attend_fused(normed.reshape([b * t, w]), ctx, b);
            let [_, hd] = heads.dims();
            heads.reshape([b, t, hd])
        } else {
            self.self_attn.attend(normed, ctx)
        };
        let h = last_row(x) + project(&self.self_attn.o_proj, last_row(heads), fused);
        h.clone()
            + self
                .mlp
                .forward(rms_norm(&self.post_attention_layernorm, h, fused), fused)
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

/// Embedding, layers and final norm: HF's `model.*`.
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
    /// Final hidden states (after the last norm), rotating by `inv_freq`.
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[batch, seq]`, left-padded (mask 1 on real tokens)
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        ids: Tensor<2, Int>,
        mask: Tensor<2, Int>,
        inv_freq: &[f32],
    ) -> Tensor<3> {
        self.forward_with(ids, mask, inv_freq, Kernels::Auto)
    }

    /// [`Decoder::forward`] with a choice of kernels.
    pub fn forward_with(
        &self,
        ids: Tensor<2, Int>,
        mask: Tensor<2, Int>,
        inv_freq: &[f32],
        kernels: Kernels,
    ) -> Tensor<3> {
        self.decode(
            self.embed_tokens.forward(ids),
            mask,
            inv_freq,
            kernels,
            false,
        )
    }

    /// The final hidden state at the last position only (left padding puts every row's last
    /// real token there): equal to [`Decoder::forward`]'s last row, but the last layer's output
    /// projection and MLP and the final norm run on that row alone, forward and backward.
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[batch, seq]`, left-padded; output: `[batch, hidden]`
    pub fn forward_last(
        &self,
        ids: Tensor<2, Int>,
        mask: Tensor<2, Int>,
        inv_freq: &[f32],
    ) -> Tensor<2> {
        self.forward_last_with(ids, mask, inv_freq, Kernels::Auto)
    }

    /// [`Decoder::forward_last`] with a choice of kernels.
    pub fn forward_last_with(
        &self,
        ids: Tensor<2, Int>,
        mask: Tensor<2, Int>,
        inv_freq: &[f32],
        kernels: Kernels,
    ) -> Tensor<2> {
        let h = self.decode(
            self.embed_tokens.forward(ids),
            mask,
            inv_freq,
            kernels,
            true,
        );
        let [b, _, w] = h.dims();
        h.reshape([b, w])
    }

    /// [`Decoder::forward_last`] and the embedding rows of `tokens` (`[tokens.len(), hidden]`),
    /// both from one embedding lookup: a head tied to the embedding then reads its rows
    /// without a second vocabulary-sized gradient (a transposed copy of the whole matrix's
    /// gradient, summed into the embedding's) in the backward pass.
    pub fn forward_last_and_embeddings(
        &self,
        ids: Tensor<2, Int>,
        mask: Tensor<2, Int>,
        inv_freq: &[f32],
        tokens: &[u32],
    ) -> (Tensor<2>, Tensor<2>) {
        let [b, t] = ids.dims();
        let extra = token_tensor(tokens, &ids.device());
        let n = b * t;
        let all = Tensor::cat(vec![ids.reshape([n]), extra], 0).reshape([1, n + tokens.len()]);
        let e = self.embed_tokens.forward(all);
        let [_, _, w] = e.dims();
        let x = e.clone().slice([0..1, 0..n, 0..w]).reshape([b, t, w]);
        let rows = e
            .slice([0..1, n..n + tokens.len(), 0..w])
            .reshape([tokens.len(), w]);
        let h = self.decode(x, mask, inv_freq, Kernels::Auto, true);
        (h.reshape([b, w]), rows)
    }

    /// Every position (`[batch, seq, hidden]`) or, with `last_only`, the last (`[batch, 1,
    /// hidden]`), the last layer then computing only what that row needs.
    fn decode(
        &self,
        x: Tensor<3>,
        mask: Tensor<2, Int>,
        inv_freq: &[f32],
        kernels: Kernels,
        last_only: bool,
    ) -> Tensor<3> {
        let device = x.device();
        let [b, t, w] = x.dims();
        let positions = rope::position_ids(mask.clone());
        let inv = Tensor::<1>::from_data(
            TensorData::new(inv_freq.to_vec(), [inv_freq.len()]),
            &device,
        );
        let (cos, sin) = rope::cos_sin(positions, &inv);
        let n_full = if last_only {
            self.layers.len().saturating_sub(1)
        } else {
            self.layers.len()
        };
        let fused = kernels == Kernels::Auto && fused::cpu_fused(&device);
        let (x, ctx) = if fused {
            let ctx = AttnCtx {
                cos,
                sin,
                mask: AttnMask::Fused(mask.float()),
            };
            let mut x = x.reshape([b * t, w]);
            for layer in &self.layers[..n_full] {
                x = layer.forward_rows(x, &ctx, b);
            }
            (x.reshape([b, t, w]), ctx)
        } else {
            // masked[b, 0, i, j] = key j is in the future of query i, or is padding.
            // tril_mask is true outside the lower triangle: exactly the future keys (j > i).
            let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &device)
                .reshape([1, 1, t, t])
                .expand([b, 1, t, t]);
            let pad = mask
                .equal_elem(0)
                .reshape([b, 1, 1, t])
                .expand([b, 1, t, t]);
            let ctx = AttnCtx {
                cos,
                sin,
                mask: AttnMask::Composed(future.bool_or(pad)),
            };
            let mut x = x;
            for layer in &self.layers[..n_full] {
                x = layer.forward(x, &ctx);
            }
            (x, ctx)
        };
        if !last_only {
            return rms_norm(&self.norm, x, fused);
        }
        let x = match self.layers.last() {
            Some(layer) => layer.forward_last(x, &ctx),
            None => last_row(x),
        };
        rms_norm(&self.norm, x, fused).reshape([b, 1, w])
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
        self.model.forward(ids, mask, &self.inv_freq)
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
            None => {
                let (last, rows) =
                    self.model
                        .forward_last_and_embeddings(ids, mask, &self.inv_freq, token_ids);
                last.matmul(rows.transpose())
            }
            Some(head) => {
                let last = self.model.forward_last(ids, mask, &self.inv_freq);
                let idx = token_tensor(token_ids, &last.device());
                last.matmul(head.weight.val().select(1, idx))
            }
        }
    }
}
