//! The LLaMA / Qwen2 / Qwen3 decoder as an ONNX graph, op for op what gram-model's burn model
//! computes (and HF transformers before it): embedding, RMS norms, rotary positions from the
//! attention mask (left padding), grouped-query attention with a causal + padding mask, SwiGLU,
//! and one of two heads.
//!
//! Choices made for onnxruntime's CPU kernels (opset 23): activations stay `[b, t, heads *
//! head_dim]` throughout; one product per projection (no Split copies); RotaryEmbedding for the
//! rotary positions; Attention for attention (per row and head: scores with the mask added,
//! softmax while they are in cache, the product with the values, written straight into the
//! output layout; grouped query heads read their shared key/value head in place); RMS norms use
//! the Pow-ReduceMean-Add-Sqrt-Div-Mul pattern that onnxruntime fuses into one kernel; the
//! `judge` head multiplies only the last position by only the two label rows of the output
//! matrix, and its last layer computes only that position past the key/value projections.

use std::collections::BTreeMap;

use gram_core::{F32Tensor, ModelConfig};

use crate::graph::{Attr, Dim, Graph};
use crate::proto::dtype;

/// What the graph outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// `judge_logits` `[batch, n]`: the logits of the given token ids at the last position.
    Judge(Vec<u32>),
    /// `logits` `[batch, seq, vocab]`: every position, the whole vocabulary.
    Lm,
    /// `key_{l}`, `value_{l}` `[batch, seq, kv_heads * head_dim]` of every layer (rotated): used
    /// once at export to precompute the judge prefix.
    KeyValues,
}

/// Keys and values of a fixed token prefix (the judge template before the question), per
/// layer, `[1, len, kv_heads * head_dim]`: baked into a judge graph, whose inputs are then only
/// the tokens after the prefix.
#[derive(Debug, Clone)]
pub struct PrefixKv {
    /// The prefix's token ids.
    pub ids: Vec<u32>,
    /// Keys per layer.
    pub keys: Vec<Vec<f32>>,
    /// Values per layer.
    pub values: Vec<Vec<f32>>,
}

/// Errors of graph construction: a tensor missing or of the wrong size.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint tensor `{0}`: {1}")]
pub struct MissingTensor(pub String, pub String);

struct W<'a> {
    t: &'a BTreeMap<String, F32Tensor>,
}

impl W<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<&F32Tensor, MissingTensor> {
        let t = self
            .t
            .get(name)
            .ok_or_else(|| MissingTensor(name.into(), "not in the checkpoint".into()))?;
        if t.shape != shape {
            return Err(MissingTensor(
                name.into(),
                format!("shape {:?}, expected {shape:?}", t.shape),
            ));
        }
        Ok(t)
    }
}

/// `[out, in]` row-major (PyTorch's Linear layout) to `[in, out]`, what MatMul wants.
fn transposed(t: &F32Tensor) -> Vec<f32> {
    let (o, i) = (t.shape[0], t.shape[1]);
    let mut out = vec![0f32; o * i];
    for r in 0..o {
        for c in 0..i {
            out[c * o + r] = t.data[r * i + c];
        }
    }
    out
}

/// Concatenates `[out_k, in]` linear weights along `out` and transposes: `[in, sum out_k]`.
fn fused_linear(parts: &[&F32Tensor]) -> (Vec<usize>, Vec<f32>) {
    let inp = parts[0].shape[1];
    let rows: usize = parts.iter().map(|p| p.shape[0]).sum();
    let mut cat = Vec::with_capacity(rows * inp);
    for p in parts {
        cat.extend_from_slice(&p.data);
    }
    let t = F32Tensor {
        shape: vec![rows, inp],
        data: cat,
    };
    (vec![inp, rows], transposed(&t))
}

struct Builder<'a> {
    g: Graph,
    w: W<'a>,
    c: &'a ModelConfig,
    eps: String,
    prefix: Option<&'a PrefixKv>,
    /// `[batch, 1, 1]`, to broadcast the prefix's keys and values over the batch.
    batch_shape: String,
    /// Each layer's rotated keys and values (for [`Head::KeyValues`]).
    kv_out: Vec<(String, String)>,
}

impl Builder<'_> {
    fn rms_norm(&mut self, x: &str, weight: &str, dim: usize) -> Result<String, MissingTensor> {
        let w = self.w.get(weight, &[dim])?;
        let w = self.g.weight(weight, &[dim], &w.data);
        let two = self.g.scalar(2.0);
        let sq = self.g.node("Pow", &[x, &two], vec![]);
        let axes = self.g.vec_i64(&[-1]);
        let mean = self.g.node(
            "ReduceMean",
            &[&sq, &axes],
            vec![("keepdims", Attr::Int(1))],
        );
        let eps = self.eps.clone();
        let var = self.g.node("Add", &[&mean, &eps], vec![]);
        let rms = self.g.node("Sqrt", &[&var], vec![]);
        let normed = self.g.node("Div", &[x, &rms], vec![]);
        Ok(self.g.node("Mul", &[&normed, &w], vec![]))
    }

    /// `x @ W` for the linear layers named `names` (concatenated), plus their biases if any.
    fn linear(
        &mut self,
        x: &str,
        names: &[&str],
        shapes: &[[usize; 2]],
        bias: bool,
        fused: &str,
    ) -> Result<String, MissingTensor> {
        let parts = names
            .iter()
            .zip(shapes)
            .map(|(n, s)| self.w.get(&format!("{n}.weight"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let (dims, data) = fused_linear(&parts);
        let wname = self.g.weight(&format!("{fused}.weight_t"), &dims, &data);
        let y = self.g.node("MatMul", &[x, &wname], vec![]);
        if !bias {
            return Ok(y);
        }
        let mut b = Vec::new();
        for (n, s) in names.iter().zip(shapes) {
            b.extend_from_slice(&self.w.get(&format!("{n}.bias"), &[s[0]])?.data);
        }
        let bname = self.g.weight(&format!("{fused}.bias"), &[b.len()], &b);
        Ok(self.g.node("Add", &[&y, &bname], vec![]))
    }

    /// Rotary positions on `[b, t, n * d]` (onnxruntime's RotaryEmbedding kernel: the
    /// non-interleaved halves, as transformers' `rotate_half`); `cos` and `sin` are `[b, t, d/2]`.
    fn rope(&mut self, x: &str, cos: &str, sin: &str, heads: usize) -> String {
        self.g.node(
            "RotaryEmbedding",
            &[x, cos, sin],
            vec![("num_heads", Attr::Int(heads as i64))],
        )
    }

    /// RMS norm of each head of `[b, t, n * d]` (Qwen3's q/k norms).
    fn head_norm(&mut self, x: &str, heads: usize, weight: &str) -> Result<String, MissingTensor> {
        let d = self.c.head_dim as i64;
        let split = self.g.vec_i64(&[0, 0, heads as i64, d]);
        let y = self.g.node("Reshape", &[x, &split], vec![]);
        let y = self.rms_norm(&y, weight, d as usize)?;
        let joined = self.g.vec_i64(&[0, 0, heads as i64 * d]);
        Ok(self.g.node("Reshape", &[&y, &joined], vec![]))
    }

    /// `x[:, -1:, ...]` along `axis`.
    fn last(&mut self, x: &str, axis: i64) -> String {
        let (st, en, ax) = (
            self.g.vec_i64(&[-1]),
            self.g.vec_i64(&[i64::MAX]),
            self.g.vec_i64(&[axis]),
        );
        self.g.node("Slice", &[x, &st, &en, &ax], vec![])
    }

    /// One decoder layer. With `last_only` (the judge head's last layer) only the last position
    /// is computed past the key/value projections: its query, attention row, output
    /// projection and MLP; the output is `[batch, 1, hidden]`.
    fn layer(
        &mut self,
        l: usize,
        x: &str,
        cos: &str,
        sin: &str,
        bias: &str,
        last_only: bool,
    ) -> Result<String, MissingTensor> {
        let c = self.c;
        let p = format!("model.layers.{l}");
        let (h, d, nh, nkv) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let (q, kv) = (nh * d, nkv * d);
        let (qp, kp, vp) = (
            format!("{p}.self_attn.q_proj"),
            format!("{p}.self_attn.k_proj"),
            format!("{p}.self_attn.v_proj"),
        );
        let xn = self.rms_norm(x, &format!("{p}.input_layernorm.weight"), h)?;
        // One product per projection: a fused q/k/v product would need a Split, a copy of
        // every row, and Attention takes the three apart anyway.
        let xq = if last_only {
            self.last(&xn, 1)
        } else {
            xn.clone()
        };
        let qx = self.linear(&xq, &[&qp], &[[q, h]], c.qkv_bias, &qp)?;
        let kx = self.linear(&xn, &[&kp], &[[kv, h]], c.qkv_bias, &kp)?;
        let vx = self.linear(&xn, &[&vp], &[[kv, h]], c.qkv_bias, &vp)?;
        let (qx, kx) = if c.qk_norm {
            (
                self.head_norm(&qx, nh, &format!("{p}.self_attn.q_norm.weight"))?,
                self.head_norm(&kx, nkv, &format!("{p}.self_attn.k_norm.weight"))?,
            )
        } else {
            (qx, kx)
        };
        let (qcos, qsin, qbias) = if last_only {
            (self.last(cos, 1), self.last(sin, 1), self.last(bias, 2))
        } else {
            (cos.to_string(), sin.to_string(), bias.to_string())
        };
        let qr = self.rope(&qx, &qcos, &qsin, nh);
        let kr = self.rope(&kx, cos, sin, nkv);
        self.kv_out.push((kr.clone(), vx.clone()));
        // With a precomputed prefix, its keys and values come first (they are always visible:
        // the mask's prefix columns are 0).
        let (kr, vx) = match self.prefix {
            Some(p) => {
                let n = p.ids.len();
                let kp = self.g.weight(
                    &format!("{p_}.prefix_keys", p_ = p_name(l)),
                    &[1, n, kv],
                    &p.keys[l],
                );
                let vp = self.g.weight(
                    &format!("{p_}.prefix_values", p_ = p_name(l)),
                    &[1, n, kv],
                    &p.values[l],
                );
                let bs = self.batch_shape.clone();
                let kp = self.g.node("Expand", &[&kp, &bs], vec![]);
                let vp = self.g.node("Expand", &[&vp, &bs], vec![]);
                (
                    self.g
                        .node("Concat", &[&kp, &kr], vec![("axis", Attr::Int(1))]),
                    self.g
                        .node("Concat", &[&vp, &vx], vec![("axis", Attr::Int(1))]),
                )
            }
            None => (kr, vx),
        };
        // onnxruntime's Attention kernel: per (row, query head) one product against its key
        // head (grouped heads read the shared key/value head in place), the mask added inside
        // that product, softmax while the block is in cache, then the product with the values,
        // written straight into [b, t, heads * d].
        let ctx = self.g.node(
            "Attention",
            &[&qr, &kr, &vx, &qbias],
            vec![
                ("q_num_heads", Attr::Int(nh as i64)),
                ("kv_num_heads", Attr::Int(nkv as i64)),
                ("scale", Attr::Float(1.0 / (d as f32).sqrt())),
            ],
        );
        let o = self.linear(
            &ctx,
            &[&format!("{p}.self_attn.o_proj")],
            &[[h, q]],
            c.o_bias,
            &format!("{p}.self_attn.o_proj"),
        )?;
        let resid = if last_only {
            self.last(x, 1)
        } else {
            x.to_string()
        };
        let x = self.g.node("Add", &[&resid, &o], vec![]);

        let i = c.intermediate_size;
        let xn = self.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"), h)?;
        let gate = self.linear(
            &xn,
            &[&format!("{p}.mlp.gate_proj")],
            &[[i, h]],
            c.mlp_bias,
            &format!("{p}.mlp.gate_proj"),
        )?;
        let up = self.linear(
            &xn,
            &[&format!("{p}.mlp.up_proj")],
            &[[i, h]],
            c.mlp_bias,
            &format!("{p}.mlp.up_proj"),
        )?;
        let sig = self.g.node("Sigmoid", &[&gate], vec![]);
        let act = self.g.node("Mul", &[&gate, &sig], vec![]);
        let act = self.g.node("Mul", &[&act, &up], vec![]);
        let down = self.linear(
            &act,
            &[&format!("{p}.mlp.down_proj")],
            &[[h, i]],
            c.mlp_bias,
            &format!("{p}.mlp.down_proj"),
        )?;
        Ok(self.g.node("Add", &[&x, &down], vec![]))
    }
}

fn p_name(l: usize) -> String {
    format!("model.layers.{l}.self_attn")
}

/// Builds the graph. `inv_freq` are the rotary inverse frequencies (gram-model computes them as
/// transformers does, scaling included). With `prefix` (judge head only) the inputs are the
/// tokens after that prefix: positions start at its length and every query also attends to its
/// precomputed keys and values.
pub fn build(
    c: &ModelConfig,
    tensors: &BTreeMap<String, F32Tensor>,
    inv_freq: &[f32],
    head: &Head,
    prefix: Option<&PrefixKv>,
) -> Result<Graph, MissingTensor> {
    let mut g = Graph::default();
    let dyn2 = [Dim::Named("batch"), Dim::Named("sequence")];
    let ids = g.input("input_ids", dtype::INT64, &dyn2);
    let mask = g.input("attention_mask", dtype::INT64, &dyn2);
    let eps = g.scalar(c.rms_norm_eps as f32);
    let float = || vec![("to", Attr::Int(i64::from(dtype::FLOAT)))];
    let const_f = |x: f32| {
        vec![(
            "value",
            Attr::Tensor(crate::proto::TensorProto {
                dims: vec![1],
                data_type: Some(dtype::FLOAT),
                raw_data: Some(x.to_le_bytes().to_vec()),
                ..Default::default()
            }),
        )]
    };
    let shape = g.node("Shape", &[&ids], vec![]);
    let (idx0, idx1) = (g.vec_i64(&[0]), g.vec_i64(&[1]));
    let bsz = g.node("Gather", &[&shape, &idx0], vec![("axis", Attr::Int(0))]);
    let t = g.node("Gather", &[&shape, &idx1], vec![("axis", Attr::Int(0))]);
    let ones2 = g.vec_i64(&[1, 1]);
    let batch_shape = g.node("Concat", &[&bsz, &ones2], vec![("axis", Attr::Int(0))]);
    let mut b = Builder {
        g,
        w: W { t: tensors },
        c,
        eps,
        prefix,
        batch_shape,
        kv_out: Vec::new(),
    };
    let (h, v) = (c.hidden_size, c.vocab_size);
    let plen = prefix.map_or(0, |p| p.ids.len());

    // Positions count real tokens: cumsum(mask) - 1, clamped at 0 (padding rows get 0), after
    // the prefix if there is one.
    let g = &mut b.g;
    let one_ax = g.ints(&[], &[1]);
    let cum = g.node("CumSum", &[&mask, &one_ax], vec![]);
    let cumf = g.node("Cast", &[&cum], float());
    let one = g.scalar(1.0);
    let pos = g.node("Sub", &[&cumf, &one], vec![]);
    let mut pos = g.node("Relu", &[&pos], vec![]);
    if plen > 0 {
        let p = g.scalar(plen as f32);
        pos = g.node("Add", &[&pos, &p], vec![]);
    }
    let ax2 = g.vec_i64(&[2]);
    let pos = g.node("Unsqueeze", &[&pos, &ax2], vec![]);
    let inv = g.weight("rope.inv_freq", &[inv_freq.len()], inv_freq);
    // [b, t, d/2]: RotaryEmbedding's per-position cache.
    let freqs = g.node("Mul", &[&pos, &inv], vec![]);
    let ax1 = g.vec_i64(&[1]);
    let cos = g.node("Cos", &[&freqs], vec![]);
    let sin = g.node("Sin", &[&freqs], vec![]);

    // Additive mask [b, 1, t, (prefix +) t]: 0 where query i may see key j (j <= i, j real; every
    // prefix key), -1e30 elsewhere (finite, as in gram-model: a padding query's row softmaxes to
    // uniform, never NaN).
    let tt = g.node("Concat", &[&t, &t], vec![("axis", Attr::Int(0))]);
    let ones = g.node("ConstantOfShape", &[&tt], const_f(1.0));
    let lower = g.node("Trilu", &[&ones], vec![("upper", Attr::Int(0))]);
    let maskf = g.node("Cast", &[&mask], float());
    let ax12 = g.vec_i64(&[1, 2]);
    let maskf = g.node("Unsqueeze", &[&maskf, &ax12], vec![]);
    let allowed = g.node("Mul", &[&lower, &maskf], vec![]);
    let allowed = g.node("Sub", &[&allowed, &one], vec![]);
    let big = g.scalar(1.0e30);
    let mut bias = g.node("Mul", &[&allowed, &big], vec![]);
    if plen > 0 {
        let (one1, pl) = (g.vec_i64(&[1]), g.vec_i64(&[plen as i64]));
        let zshape = g.node(
            "Concat",
            &[&bsz, &one1, &t, &pl],
            vec![("axis", Attr::Int(0))],
        );
        let zeros = g.node("ConstantOfShape", &[&zshape], const_f(0.0));
        bias = g.node("Concat", &[&zeros, &bias], vec![("axis", Attr::Int(3))]);
    }

    let emb_w = b.w.get("model.embed_tokens.weight", &[v, h])?;
    let emb_name =
        b.g.weight("model.embed_tokens.weight", &[v, h], &emb_w.data);
    let mut x =
        b.g.node("Gather", &[&emb_name, &ids], vec![("axis", Attr::Int(0))]);
    for l in 0..c.num_hidden_layers {
        let last_only = matches!(head, Head::Judge(_)) && l + 1 == c.num_hidden_layers;
        x = b.layer(l, &x, &cos, &sin, &bias, last_only)?;
    }
    let head_name = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    match head {
        Head::Judge(token_ids) => {
            // Only the last position reaches the head: left padding puts every row's last real
            // token there.
            let last_idx = b.g.ints(&[], &[-1]);
            let last =
                b.g.node("Gather", &[&x, &last_idx], vec![("axis", Attr::Int(1))]);
            let last = b.g.node("Unsqueeze", &[&last, &ax1], vec![]);
            let hn = b.rms_norm(&last, "model.norm.weight", h)?;
            let w = b.w.get(head_name, &[v, h])?;
            let n = token_ids.len();
            let mut rows = vec![0f32; h * n];
            for (j, &id) in token_ids.iter().enumerate() {
                let id = id as usize;
                if id >= v {
                    return Err(MissingTensor(
                        head_name.into(),
                        format!("label id {id} outside the vocabulary ({v})"),
                    ));
                }
                for k in 0..h {
                    rows[k * n + j] = w.data[id * h + k];
                }
            }
            let wl = b.g.weight("judge_head.weight_t", &[h, n], &rows);
            let logits = b.g.node("MatMul", &[&hn, &wl], vec![]);
            let sq = b.g.vec_i64(&[1]);
            let logits = b.g.node("Squeeze", &[&logits, &sq], vec![]);
            b.g.output(
                &logits,
                "judge_logits",
                dtype::FLOAT,
                &[Dim::Named("batch"), Dim::Fixed(n as i64)],
            );
        }
        Head::Lm => {
            let hn = b.rms_norm(&x, "model.norm.weight", h)?;
            let w_name = if c.tie_word_embeddings {
                emb_name
            } else {
                let w = b.w.get("lm_head.weight", &[v, h])?;
                b.g.weight("lm_head.weight", &[v, h], &w.data)
            };
            // [b, t, h] x [v, h]^T through Gemm on the flattened rows (no transposed copy of a
            // tied embedding).
            let flat_shape = b.g.vec_i64(&[-1, h as i64]);
            let flat = b.g.node("Reshape", &[&hn, &flat_shape], vec![]);
            let logits =
                b.g.node("Gemm", &[&flat, &w_name], vec![("transB", Attr::Int(1))]);
            let out_shape = b.g.node("Shape", &[&ids], vec![]);
            let vv = b.g.vec_i64(&[v as i64]);
            let out_shape =
                b.g.node("Concat", &[&out_shape, &vv], vec![("axis", Attr::Int(0))]);
            let logits = b.g.node("Reshape", &[&logits, &out_shape], vec![]);
            b.g.output(
                &logits,
                "logits",
                dtype::FLOAT,
                &[
                    Dim::Named("batch"),
                    Dim::Named("sequence"),
                    Dim::Fixed(v as i64),
                ],
            );
        }
        Head::KeyValues => {
            let kv = (c.num_key_value_heads * c.head_dim) as i64;
            let dims = || [Dim::Named("batch"), Dim::Named("sequence"), Dim::Fixed(kv)];
            for (l, (k, vv)) in std::mem::take(&mut b.kv_out).into_iter().enumerate() {
                b.g.output(&k, &format!("key_{l}"), dtype::FLOAT, &dims());
                b.g.output(&vv, &format!("value_{l}"), dtype::FLOAT, &dims());
            }
        }
    }
    Ok(b.g)
}
