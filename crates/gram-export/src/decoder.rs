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
    /// The same for pairs, each pair's shared tokens computed once: inputs `shared_ids` and
    /// `shared_mask` `[pairs, shared]` (a pair's tokens common to both orders), `input_ids` and
    /// `attention_mask` `[2 x pairs, sequence]` (each order's remaining tokens, rows 2k and
    /// 2k+1 for pair k), all left-padded; `judge_logits` `[2 x pairs, n]`.
    PairJudge(Vec<u32>),
    /// `logits` `[batch, seq, vocab]`: every position, the whole vocabulary.
    Lm,
    /// `rewards` `[batch, 1]`: a reward model's scalar head (`score.weight`) at the last position.
    Reward,
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

struct Builder<'a> {
    g: Graph,
    w: W<'a>,
    c: &'a ModelConfig,
    eps: String,
    prefix: Option<&'a PrefixKv>,
    /// Each layer's rotated keys and values (for [`Head::KeyValues`]).
    kv_out: Vec<(String, String)>,
}

impl Builder<'_> {
    /// A head on the last position (left padding puts every row's last real token there):
    /// final norm, then `· rows` (`[h, n]`, row-major), output `out` `[batch, n]`.
    fn last_position_head(
        &mut self,
        x: &str,
        rows: &[f32],
        n: usize,
        weight: &str,
        out: &str,
    ) -> Result<(), MissingTensor> {
        let h = self.c.hidden_size;
        let last_idx = self.g.ints(&[], &[-1]);
        let last = self
            .g
            .node("Gather", &[x, &last_idx], vec![("axis", Attr::Int(1))]);
        let ax1 = self.g.vec_i64(&[1]);
        let last = self.g.node("Unsqueeze", &[&last, &ax1], vec![]);
        let hn = self.rms_norm(&last, "model.norm.weight", h)?;
        let wl = self.g.weight(weight, &[h, n], rows);
        let logits = self.g.node("MatMul", &[&hn, &wl], vec![]);
        let sq = self.g.vec_i64(&[1]);
        let logits = self.g.node("Squeeze", &[&logits, &sq], vec![]);
        self.g.output(
            &logits,
            out,
            dtype::FLOAT,
            &[Dim::Named("batch"), Dim::Fixed(n as i64)],
        );
        Ok(())
    }

    fn rms_norm(&mut self, x: &str, weight: &str, dim: usize) -> Result<String, MissingTensor> {
        if !self.g.has(weight) {
            let t = self.w.get(weight, &[dim])?;
            self.g.weight(weight, &[dim], &t.data);
        }
        let w = weight.to_string();
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

    /// `x @ W^T (+ bias)` for the linear layer `name` (`[out, in]` = `shape`); its transposed
    /// weight becomes one initializer however many streams use it.
    fn linear(
        &mut self,
        x: &str,
        name: &str,
        shape: [usize; 2],
        bias: bool,
    ) -> Result<String, MissingTensor> {
        let wname = format!("{name}.weight_t");
        if !self.g.has(&wname) {
            let w = self.w.get(&format!("{name}.weight"), &shape)?;
            self.g
                .weight(&wname, &[shape[1], shape[0]], &w.transposed().data);
        }
        let y = self.g.node("MatMul", &[x, &wname], vec![]);
        if !bias {
            return Ok(y);
        }
        let bname = format!("{name}.bias");
        if !self.g.has(&bname) {
            let b = self.w.get(&bname, &[shape[0]])?;
            self.g.weight(&bname, &[shape[0]], &b.data);
        }
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

    /// The rotated keys and the values of layer `l` from its normalised input, `[b, t, kv]`.
    fn keys_values(
        &mut self,
        l: usize,
        xn: &str,
        s: &Stream,
    ) -> Result<(String, String), MissingTensor> {
        let c = self.c;
        let (h, nkv) = (c.hidden_size, c.num_key_value_heads);
        let kv = nkv * c.head_dim;
        let p = p_name(l);
        let (kp, vp) = (format!("{p}.k_proj"), format!("{p}.v_proj"));
        let kx = self.linear(xn, &kp, [kv, h], c.qkv_bias)?;
        let vx = self.linear(xn, &vp, [kv, h], c.qkv_bias)?;
        let kx = if c.qk_norm {
            self.head_norm(&kx, nkv, &format!("{p}.k_norm.weight"))?
        } else {
            kx
        };
        Ok((self.rope(&kx, &s.cos, &s.sin, nkv), vx))
    }

    /// One decoder layer over a stream. Keys and values are, in order: the judge prefix's
    /// (precomputed), `past` (another stream's, row-matched), the stream's own; `s.bias` covers
    /// them in that order. With `last_only` (the judge head's last layer) only the last position
    /// is computed past the key/value projections: its query, attention row, output projection
    /// and MLP; the output is then `[batch, 1, hidden]`. Returns the output and the layer's own
    /// rotated keys and values.
    fn layer(
        &mut self,
        l: usize,
        x: &str,
        s: &Stream,
        last_only: bool,
        past: Option<&(String, String)>,
    ) -> Result<(String, String, String), MissingTensor> {
        let c = self.c;
        let p = format!("model.layers.{l}");
        let (h, d, nh, nkv) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let (q, kv) = (nh * d, nkv * d);
        let xn = self.rms_norm(x, &format!("{p}.input_layernorm.weight"), h)?;
        // One product per projection: a fused q/k/v product would need a Split, a copy of
        // every row, and Attention takes the three apart anyway.
        let (kr, vx) = self.keys_values(l, &xn, s)?;
        let xq = if last_only {
            self.last(&xn, 1)
        } else {
            xn.clone()
        };
        let qx = self.linear(&xq, &format!("{p}.self_attn.q_proj"), [q, h], c.qkv_bias)?;
        let qx = if c.qk_norm {
            self.head_norm(&qx, nh, &format!("{p}.self_attn.q_norm.weight"))?
        } else {
            qx
        };
        let (qcos, qsin, qbias) = if last_only {
            (
                self.last(&s.cos, 1),
                self.last(&s.sin, 1),
                self.last(&s.bias, 2),
            )
        } else {
            (s.cos.clone(), s.sin.clone(), s.bias.clone())
        };
        let qr = self.rope(&qx, &qcos, &qsin, nh);
        // Keys and values in the order the mask's columns follow.
        let mut keys = Vec::new();
        let mut values = Vec::new();
        if let Some(pre) = self.prefix {
            let n = pre.ids.len();
            let (kp, vp) = (
                format!("{}.prefix_keys", p_name(l)),
                format!("{}.prefix_values", p_name(l)),
            );
            if !self.g.has(&kp) {
                self.g.weight(&kp, &[1, n, kv], &pre.keys[l]);
                self.g.weight(&vp, &[1, n, kv], &pre.values[l]);
            }
            keys.push(self.g.node("Expand", &[&kp, &s.batch_shape], vec![]));
            values.push(self.g.node("Expand", &[&vp, &s.batch_shape], vec![]));
        }
        if let Some((k, v)) = past {
            keys.push(k.clone());
            values.push(v.clone());
        }
        keys.push(kr.clone());
        values.push(vx.clone());
        let cat = |b: &mut Self, parts: &[String]| -> String {
            if parts.len() == 1 {
                return parts[0].clone();
            }
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            b.g.node("Concat", &refs, vec![("axis", Attr::Int(1))])
        };
        let (k_all, v_all) = (cat(self, &keys), cat(self, &values));
        // onnxruntime's Attention kernel: per (row, query head) one product against its key
        // head (grouped heads read the shared key/value head in place), the mask added inside
        // that product, softmax while the block is in cache, then the product with the values,
        // written straight into [b, t, heads * d].
        let ctx = self.g.node(
            "Attention",
            &[&qr, &k_all, &v_all, &qbias],
            vec![
                ("q_num_heads", Attr::Int(nh as i64)),
                ("kv_num_heads", Attr::Int(nkv as i64)),
                ("scale", Attr::Float(1.0 / (d as f32).sqrt())),
            ],
        );
        let o = self.linear(&ctx, &format!("{p}.self_attn.o_proj"), [h, q], c.o_bias)?;
        let resid = if last_only {
            self.last(x, 1)
        } else {
            x.to_string()
        };
        let x = self.g.node("Add", &[&resid, &o], vec![]);

        let i = c.intermediate_size;
        let xn = self.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"), h)?;
        let gate = self.linear(&xn, &format!("{p}.mlp.gate_proj"), [i, h], c.mlp_bias)?;
        let up = self.linear(&xn, &format!("{p}.mlp.up_proj"), [i, h], c.mlp_bias)?;
        let sig = self.g.node("Sigmoid", &[&gate], vec![]);
        let act = self.g.node("Mul", &[&gate, &sig], vec![]);
        let act = self.g.node("Mul", &[&act, &up], vec![]);
        let down = self.linear(&act, &format!("{p}.mlp.down_proj"), [h, i], c.mlp_bias)?;
        Ok((self.g.node("Add", &[&x, &down], vec![]), kr, vx))
    }

    /// `[rows, ...]` to `[2 x rows, ...]`, each row twice in a row (a pair's shared part, once
    /// for each order).
    fn twice(&mut self, x: &str) -> String {
        let ax1 = self.g.vec_i64(&[1]);
        let u = self.g.node("Unsqueeze", &[x, &ax1], vec![]);
        let both = self
            .g
            .node("Concat", &[&u, &u], vec![("axis", Attr::Int(1))]);
        let shape = self.g.node("Shape", &[x], vec![("start", Attr::Int(1))]);
        let minus1 = self.g.vec_i64(&[-1]);
        let shape = self
            .g
            .node("Concat", &[&minus1, &shape], vec![("axis", Attr::Int(0))]);
        self.g.node("Reshape", &[&both, &shape], vec![])
    }

    /// An f32 tensor of `value`s of the shape given by the int64 vector `shape`.
    fn filled(&mut self, shape: &str, value: f32) -> String {
        let attr = vec![(
            "value",
            Attr::Tensor(crate::proto::TensorProto {
                dims: vec![1],
                data_type: Some(dtype::FLOAT),
                raw_data: Some(value.to_le_bytes().to_vec()),
                ..Default::default()
            }),
        )];
        self.g.node("ConstantOfShape", &[shape], attr)
    }

    /// `{0, 1}` int64 `[b, n]` -> additive f32 `[b, 1, 1, n]`: 0 on 1s, -1e30 on 0s.
    fn key_bias(&mut self, mask: &str) -> String {
        let f = self.g.node("Cast", &[mask], float_to());
        let ax12 = self.g.vec_i64(&[1, 2]);
        let f = self.g.node("Unsqueeze", &[&f, &ax12], vec![]);
        let one = self.g.scalar(1.0);
        let f = self.g.node("Sub", &[&f, &one], vec![]);
        let big = self.g.scalar(1.0e30);
        self.g.node("Mul", &[&f, &big], vec![])
    }

    /// Everything a stream of `ids`/`mask` (left-padded `[b, t]`) needs: its embedded tokens,
    /// rotary tables, batch shape and the attention mask over [judge prefix, `past`, own keys].
    /// Positions count real tokens: cumsum(mask) - 1 (padding gets 0), after the judge prefix
    /// and `offset` (`[b, 1]` f32: real tokens of `past`) if given. `past` is the `{0, 1}`
    /// int64 mask `[b, n]` of keys from another stream that every query may see where it is 1.
    fn stream(
        &mut self,
        ids: &str,
        mask: &str,
        embedding: &str,
        inv_freq: &str,
        offset: Option<&str>,
        past: Option<&str>,
    ) -> (String, Stream) {
        let plen = self.prefix.map_or(0, |p| p.ids.len());
        let g = &mut self.g;
        let x = g.node("Gather", &[embedding, ids], vec![("axis", Attr::Int(0))]);
        let shape = g.node("Shape", &[ids], vec![]);
        let (idx0, idx1) = (g.vec_i64(&[0]), g.vec_i64(&[1]));
        let bsz = g.node("Gather", &[&shape, &idx0], vec![("axis", Attr::Int(0))]);
        let t = g.node("Gather", &[&shape, &idx1], vec![("axis", Attr::Int(0))]);
        let ones2 = g.vec_i64(&[1, 1]);
        let batch_shape = g.node("Concat", &[&bsz, &ones2], vec![("axis", Attr::Int(0))]);

        let one_ax = g.ints(&[], &[1]);
        let cum = g.node("CumSum", &[mask, &one_ax], vec![]);
        let cumf = g.node("Cast", &[&cum], float_to());
        let one = g.scalar(1.0);
        let pos = g.node("Sub", &[&cumf, &one], vec![]);
        let mut pos = g.node("Relu", &[&pos], vec![]);
        if plen > 0 {
            let p = g.scalar(plen as f32);
            pos = g.node("Add", &[&pos, &p], vec![]);
        }
        if let Some(o) = offset {
            pos = g.node("Add", &[&pos, o], vec![]);
        }
        let ax2 = g.vec_i64(&[2]);
        let pos = g.node("Unsqueeze", &[&pos, &ax2], vec![]);
        // [b, t, d/2]: RotaryEmbedding's per-position cache.
        let freqs = g.node("Mul", &[&pos, inv_freq], vec![]);
        let cos = g.node("Cos", &[&freqs], vec![]);
        let sin = g.node("Sin", &[&freqs], vec![]);

        // Additive mask [b, 1, t, keys]: 0 where query i may see key j, -1e30 elsewhere
        // (finite, as in gram-model: a row with nothing visible softmaxes to uniform, never
        // NaN). Own keys: j <= i and j real; prefix keys: always; `past` keys: where real.
        let tt = g.node("Concat", &[&t, &t], vec![("axis", Attr::Int(0))]);
        let ones = self.filled(&tt, 1.0);
        let g = &mut self.g;
        let lower = g.node("Trilu", &[&ones], vec![("upper", Attr::Int(0))]);
        let maskf = g.node("Cast", &[mask], float_to());
        let ax12 = g.vec_i64(&[1, 2]);
        let maskf = g.node("Unsqueeze", &[&maskf, &ax12], vec![]);
        let allowed = g.node("Mul", &[&lower, &maskf], vec![]);
        let allowed = g.node("Sub", &[&allowed, &one], vec![]);
        let big = g.scalar(1.0e30);
        let own = g.node("Mul", &[&allowed, &big], vec![]);
        let mut cols = Vec::new();
        if plen > 0 {
            let (one1, pl) = (g.vec_i64(&[1]), g.vec_i64(&[plen as i64]));
            let zshape = g.node(
                "Concat",
                &[&bsz, &one1, &t, &pl],
                vec![("axis", Attr::Int(0))],
            );
            cols.push(self.filled(&zshape, 0.0));
        }
        if let Some(pm) = past {
            let kb = self.key_bias(pm);
            // [b, 1, 1, n] -> [b, 1, t, n].
            let g = &mut self.g;
            let one1 = g.vec_i64(&[1]);
            let rows = g.node(
                "Concat",
                &[&one1, &one1, &t, &one1],
                vec![("axis", Attr::Int(0))],
            );
            cols.push(g.node("Expand", &[&kb, &rows], vec![]));
        }
        cols.push(own);
        let bias = if cols.len() == 1 {
            cols.pop().unwrap_or_default()
        } else {
            let refs: Vec<&str> = cols.iter().map(String::as_str).collect();
            self.g.node("Concat", &refs, vec![("axis", Attr::Int(3))])
        };
        (
            x,
            Stream {
                cos,
                sin,
                bias,
                batch_shape,
            },
        )
    }
}

/// What every layer needs to know of one stream of tokens.
struct Stream {
    /// Rotary tables `[b, t, d/2]`.
    cos: String,
    sin: String,
    /// Additive attention mask `[b, 1, t, keys]`.
    bias: String,
    /// `[b, 1, 1]`, to broadcast the judge prefix's keys and values over the batch.
    batch_shape: String,
}

fn float_to() -> Vec<(&'static str, Attr)> {
    vec![("to", Attr::Int(i64::from(dtype::FLOAT)))]
}

fn p_name(l: usize) -> String {
    format!("model.layers.{l}.self_attn")
}

/// Builds the graph. `inv_freq` are the rotary inverse frequencies (gram-model computes them as
/// transformers does, scaling included). With `prefix` (judge heads only) the token inputs are
/// the tokens after that prefix: positions start at its length and every query also attends to
/// its precomputed keys and values.
pub fn build(
    c: &ModelConfig,
    tensors: &BTreeMap<String, F32Tensor>,
    inv_freq: &[f32],
    head: &Head,
    prefix: Option<&PrefixKv>,
) -> Result<Graph, MissingTensor> {
    let mut g = Graph::default();
    let dyn2 = [Dim::Named("batch"), Dim::Named("sequence")];
    let pairs = matches!(head, Head::PairJudge(_));
    let shared_inputs = pairs.then(|| {
        let dims = [Dim::Named("pairs"), Dim::Named("shared")];
        (
            g.input("shared_ids", dtype::INT64, &dims),
            g.input("shared_mask", dtype::INT64, &dims),
        )
    });
    let ids = g.input("input_ids", dtype::INT64, &dyn2);
    let mask = g.input("attention_mask", dtype::INT64, &dyn2);
    let eps = g.scalar(c.rms_norm_eps as f32);
    let mut b = Builder {
        g,
        w: W { t: tensors },
        c,
        eps,
        prefix,
        kv_out: Vec::new(),
    };
    let (h, v) = (c.hidden_size, c.vocab_size);
    let emb_w = b.w.get("model.embed_tokens.weight", &[v, h])?;
    let emb_name =
        b.g.weight("model.embed_tokens.weight", &[v, h], &emb_w.data);
    let inv = b.g.weight("rope.inv_freq", &[inv_freq.len()], inv_freq);
    let layers = c.num_hidden_layers;
    let judge = matches!(head, Head::Judge(_) | Head::PairJudge(_) | Head::Reward);

    let x = match &shared_inputs {
        None => {
            let (mut x, s) = b.stream(&ids, &mask, &emb_name, &inv, None, None);
            for l in 0..layers {
                let last_only = judge && l + 1 == layers;
                let (y, k, vv) = b.layer(l, &x, &s, last_only, None)?;
                b.kv_out.push((k, vv));
                x = y;
            }
            x
        }
        Some((sids, smask)) => {
            // Pairs: the shared tokens run once per pair; each order's own tokens see the
            // pair's shared keys and values (repeated for both rows) after the judge prefix.
            let (mut xs, ss) = b.stream(sids, smask, &emb_name, &inv, None, None);
            let real = b.g.node("Cast", &[smask], float_to());
            let ax1 = b.g.vec_i64(&[1]);
            let real = b.g.node(
                "ReduceSum",
                &[&real, &ax1],
                vec![("keepdims", Attr::Int(1))],
            );
            let offset = b.twice(&real);
            let smask2 = b.twice(smask);
            let (mut x, s) = b.stream(&ids, &mask, &emb_name, &inv, Some(&offset), Some(&smask2));
            for l in 0..layers {
                let last = l + 1 == layers;
                let (k, vv) = if last {
                    // The shared stream's last layer: only its keys and values are read.
                    let xn =
                        b.rms_norm(&xs, &format!("model.layers.{l}.input_layernorm.weight"), h)?;
                    b.keys_values(l, &xn, &ss)?
                } else {
                    let (y, k, vv) = b.layer(l, &xs, &ss, false, None)?;
                    xs = y;
                    (k, vv)
                };
                let past = (b.twice(&k), b.twice(&vv));
                x = b.layer(l, &x, &s, last, Some(&past))?.0;
            }
            x
        }
    };
    let head_name = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    match head {
        Head::Judge(token_ids) | Head::PairJudge(token_ids) => {
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
            b.last_position_head(&x, &rows, n, "judge_head.weight_t", "judge_logits")?;
        }
        Head::Reward => {
            // score.weight is [1, h]: as [h, 1] it is the same values.
            let w = b.w.get("score.weight", &[1, h])?;
            let rows = w.data.clone();
            b.last_position_head(&x, &rows, 1, "score.weight_t", "rewards")?;
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
