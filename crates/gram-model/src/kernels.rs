//! CPU kernels behind the fused operations of [`crate::fused`]: causal attention with the rotary
//! embedding applied inside, RMSNorm and SwiGLU, each with its backward pass, on contiguous f32
//! slices. Work is split over (batch, head) or over fixed chunks of rows with rayon; every sum is
//! taken in a fixed order, so results do not depend on thread timing (resumed CPU runs stay
//! bit-identical). Matrix products go through the `gemm` crate: single-threaded inside a task, or
//! spread over the pool for the projections ([`matmul_new`]).
//!
//! What composing burn's primitive operations costs and this saves: the attention scores
//! `[batch, heads, seq, seq]` are never materialised as a tensor (one `seq x seq` block per task,
//! in cache), the scale, mask, softmax and their backward are one pass each instead of a dozen
//! tensor-wide ones, and the q/k/v head transposes and the RoPE slices/concats disappear.

use rayon::prelude::*;

/// Rows per parallel chunk in the row-wise kernels (fixed, so sums are taken in a fixed order).
const ROWS_PER_CHUNK: usize = 64;
/// Elements per parallel chunk in the element-wise kernels.
const ELEMS_PER_CHUNK: usize = 1 << 14;

/// Checks the bounds gemm will read and write for an `m x n x k` product with the given strides,
/// so that the unsafe calls below stay inside their slices.
#[allow(clippy::too_many_arguments)]
fn check_product(
    c_len: usize,
    c_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    assert!((m - 1) * c_rs + n <= c_len, "matmul: output out of bounds");
    if k > 0 {
        assert!(
            (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
            "matmul: lhs out of bounds"
        );
        assert!(
            (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
            "matmul: rhs out of bounds"
        );
    }
}

/// gemm's call for `dst = a · b` (`read_dst` false) or `dst += a · b` (true), `dst` row-major
/// with row stride `dst_rs`, operands as `(row stride, column stride)`.
///
/// # Safety
/// `check_product` must have passed for these arguments with `dst`'s capacity, and `dst` must be
/// valid for writes of that many elements and alias neither operand. When `read_dst` is true,
/// those elements must be initialised.
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn gemm_into(
    dst: *mut f32,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    read_dst: bool,
    parallelism: gemm::Parallelism,
) {
    let s = |x: usize| x as isize;
    // SAFETY: the caller's contract; gemm reads `a` and `b` inside the checked bounds, and with
    // `read_dst = false` it sets alpha to zero and its micro-kernels store without reading `dst`
    // in the first depth block (later blocks add to what the first stored).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            s(dst_rs),
            read_dst,
            a.as_ptr(),
            s(a_cs),
            s(a_rs),
            b.as_ptr(),
            s(b_cs),
            s(b_rs),
            if read_dst { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major with row stride `c_rs`; `a` is
/// `m x k` and `b` is `k x n`, each given by its row and column strides, so a transposed operand
/// is a swap of strides rather than a copy. Single-threaded: called inside parallel tasks.
#[allow(unsafe_code, clippy::too_many_arguments)]
fn matmul(
    c: &mut [f32],
    c_rs: usize,
    dims: (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    accumulate: bool,
) {
    if dims.0 == 0 || dims.1 == 0 {
        return;
    }
    check_product(c.len(), c_rs, dims, a, a_strides, b, b_strides);
    // SAFETY: bounds checked above; `c` is an initialised, mutably borrowed slice, so it is
    // valid for the writes and reads and aliases neither shared borrow `a` nor `b`.
    unsafe {
        gemm_into(
            c.as_mut_ptr(),
            c_rs,
            dims,
            a,
            a_strides,
            b,
            b_strides,
            accumulate,
            gemm::Parallelism::None,
        );
    }
}

/// `a · b` as a new row-major `m x n` vector, the product spread over rayon's pool: the
/// projections (one large product each) and their backward passes. Operands as in [`matmul`].
///
/// Why not burn's matmul: its output tensor is zero-filled and then copied once more into an
/// aligned buffer, two passes over the output on the calling thread before gemm starts; for the
/// 40M benchmark that was about a tenth of the step. Here the output is written once, by gemm.
#[allow(unsafe_code)]
pub fn matmul_new(
    dims: (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
) -> Vec<f32> {
    let (m, n, k) = dims;
    let len = m.checked_mul(n).expect("matmul: output size overflows");
    if len == 0 || k == 0 {
        return vec![0.0; len];
    }
    check_product(len, n, dims, a, a_strides, b, b_strides);
    let mut c: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: bounds checked above against the capacity `len` at row stride n; a fresh vector
    // aliases nothing; `read_dst = false`, so gemm writes every one of the `len` elements
    // without reading any, and `set_len` then covers exactly the written ones.
    unsafe {
        gemm_into(
            c.as_mut_ptr(),
            n,
            dims,
            a,
            a_strides,
            b,
            b_strides,
            false,
            gemm::Parallelism::Rayon(0),
        );
        c.set_len(len);
    }
    c
}

/// Shapes of one attention call: `q` is `[b, t, h * d]`, `k` and `v` are `[b, t, kv * d]`,
/// `cos`/`sin` are `[b, t, d]`, `keep` is `[b, t]` (1 for a real token, 0 for padding).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (divides `h`).
    pub kv: usize,
    /// Head size (even).
    pub d: usize,
}

impl AttnShape {
    fn rep(&self) -> usize {
        self.h / self.kv
    }
}

/// The inputs of an attention call, borrowed.
#[derive(Clone, Copy)]
pub struct AttnInputs<'a> {
    /// Queries `[b, t, h * d]` (before the rotary embedding).
    pub q: &'a [f32],
    /// Keys `[b, t, kv * d]` (before the rotary embedding).
    pub k: &'a [f32],
    /// Values `[b, t, kv * d]`.
    pub v: &'a [f32],
    /// `[b, t, d]`.
    pub cos: &'a [f32],
    /// `[b, t, d]`.
    pub sin: &'a [f32],
    /// `[b, t]`, nonzero on real tokens.
    pub keep: &'a [f32],
}

impl AttnInputs<'_> {
    fn check(&self, s: &AttnShape) {
        assert!(
            s.kv > 0 && s.h.is_multiple_of(s.kv) && s.d.is_multiple_of(2),
            "attention: bad heads {s:?}"
        );
        assert_eq!(self.q.len(), s.b * s.t * s.h * s.d, "attention: q");
        assert_eq!(self.k.len(), s.b * s.t * s.kv * s.d, "attention: k");
        assert_eq!(self.v.len(), s.b * s.t * s.kv * s.d, "attention: v");
        assert_eq!(self.cos.len(), s.b * s.t * s.d, "attention: cos");
        assert_eq!(self.sin.len(), s.b * s.t * s.d, "attention: sin");
        assert_eq!(self.keep.len(), s.b * s.t, "attention: keep");
    }
}

/// One head of `x` (`[b, t, heads * d]`) for batch row `bi`, rotated (HF's
/// `x * cos + rotate_half(x) * sin`) and multiplied by `scale`, as a `[t, d]` block.
fn rope_head(
    x: &[f32],
    heads: usize,
    head: usize,
    bi: usize,
    s: &AttnShape,
    inp: &AttnInputs,
    scale: f32,
) -> Vec<f32> {
    let (t, d) = (s.t, s.d);
    let half = d / 2;
    let mut out = vec![0.0f32; t * d];
    for i in 0..t {
        let row = &x[((bi * t + i) * heads + head) * d..][..d];
        let c = &inp.cos[(bi * t + i) * d..][..d];
        let sn = &inp.sin[(bi * t + i) * d..][..d];
        let o = &mut out[i * d..][..d];
        for j in 0..half {
            o[j] = (row[j] * c[j] - row[j + half] * sn[j]) * scale;
            o[j + half] = (row[j + half] * c[j + half] + row[j] * sn[j + half]) * scale;
        }
    }
    out
}

/// The transpose of [`rope_head`]'s rotation applied to a `[t, d]` gradient block, times `scale`:
/// `g * cos + rotate_half^T(g * sin)`, where `rotate_half^T(u) = [u2, -u1]`.
fn rope_head_backward(g: &mut [f32], bi: usize, s: &AttnShape, inp: &AttnInputs, scale: f32) {
    let (t, d) = (s.t, s.d);
    let half = d / 2;
    for i in 0..t {
        let c = &inp.cos[(bi * t + i) * d..][..d];
        let sn = &inp.sin[(bi * t + i) * d..][..d];
        let r = &mut g[i * d..][..d];
        for j in 0..half {
            let (a, b) = (r[j], r[j + half]);
            r[j] = (a * c[j] + b * sn[j + half]) * scale;
            r[j + half] = (b * c[j + half] - a * sn[j]) * scale;
        }
    }
}

/// One head of `x` (`[b, t, heads * d]`) for batch row `bi`, as a `[t, d]` block.
fn head_block(x: &[f32], heads: usize, head: usize, bi: usize, s: &AttnShape) -> Vec<f32> {
    let (t, d) = (s.t, s.d);
    let mut out = vec![0.0f32; t * d];
    for i in 0..t {
        out[i * d..][..d].copy_from_slice(&x[((bi * t + i) * heads + head) * d..][..d]);
    }
    out
}

/// `n` zeros, written by the pool. The kernels' outputs are activation-sized (a whole batch's
/// rows); `vec![0.0; n]` zero-fills them on the calling thread while the pool waits (perf: ~4%
/// of the 40M bench step's main-thread samples).
fn zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::new();
    rayon::iter::repeat_n(0.0f32, n).collect_into_vec(&mut v);
    v
}

/// Writes a `[t, d]` block into head `head` of one batch row's `dst` (`[t, heads * d]`).
fn scatter_head(dst: &mut [f32], block: &[f32], heads: usize, head: usize, s: &AttnShape) {
    let (t, d) = (s.t, s.d);
    for i in 0..t {
        dst[(i * heads + head) * d..][..d].copy_from_slice(&block[i * d..][..d]);
    }
}

/// Turns the scores of query `i` (a row over keys `0..row.len()`, `row.len() > i`) into
/// probabilities in place: causal (key `j <= i`) and only keys with `keep[j] != 0`; a query with
/// no visible key (a padding position) gets all zeros. Returns the row's log-sum-exp (infinite
/// for an empty row), which is what the backward pass needs to rebuild the probabilities from
/// recomputed scores.
fn softmax_causal_row(row: &mut [f32], keep: &[f32], i: usize) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for j in 0..=i {
        if keep[j] != 0.0 && row[j] > max {
            max = row[j];
        }
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::INFINITY;
    }
    exp_kept(row, keep, i, max);
    let sum = sum_lanes(&row[..=i]);
    let inv = 1.0 / sum;
    for x in &mut row[..=i] {
        *x *= inv;
    }
    max + sum.ln()
}

/// `row[j] = exp(row[j] - shift)` for the visible keys `j <= i` with `keep[j] != 0`, zero for
/// every other key (the hidden ones and the future `j > i`).
fn exp_kept(row: &mut [f32], keep: &[f32], i: usize, shift: f32) {
    for (x, k) in row[..=i].iter_mut().zip(&keep[..=i]) {
        let e = exp(*x - shift);
        *x = if *k != 0.0 { e } else { 0.0 };
    }
    row[i + 1..].fill(0.0);
}

/// Rebuilds the probabilities of query `i` from its recomputed scores and saved log-sum-exp
/// (see [`softmax_causal_row`]), in place.
fn softmax_row_from_lse(row: &mut [f32], keep: &[f32], i: usize, lse: f32) {
    if lse == f32::INFINITY {
        row.fill(0.0);
        return;
    }
    exp_kept(row, keep, i, lse);
}

/// Sum of a slice in 8 interleaved lanes, added up at the end: a fixed order (so the same on
/// every run) that the compiler can keep in vector registers.
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `e^x` in f32 without a library call, so that loops over it vectorise: Cody-Waite range
/// reduction `x = n ln 2 + r` and Cephes' degree-6 polynomial for `e^r` (relative error about
/// 1e-7, like `f32::exp`). Arguments are clamped to [-87.3, 88]: below, the result is about
/// 1.2e-38 instead of a subnormal or 0 (callers zero masked entries themselves); above, f32
/// overflows anyway. NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.0e-1;
    let y = p * r * r + r + 1.0;
    // 2^n from n's bits: the integer sits in t's low mantissa bits, offset by 2^22.
    let ni = (t.to_bits() as i32) - 0x4B40_0000;
    y * f32::from_bits(((ni + 127) << 23) as u32)
}

/// Query rows per block: a block of queries `i0..i1` only sees keys `0..i1`, so the products
/// skip the blocks above the causal diagonal (about half of the attention arithmetic).
const QUERY_BLOCK: usize = 64;

/// Scores of the query block `i0..i1` against keys `0..i1`: `q[i0..i1] · k[..i1]^T` into the
/// first `i1` columns of `pb` (rows of stride `t`); `q` and `k` are `[t, d]` blocks.
fn block_scores(
    pb: &mut [f32],
    t: usize,
    (i0, i1): (usize, usize),
    d: usize,
    q: &[f32],
    k: &[f32],
) {
    let rows = i1 - i0;
    matmul(pb, t, (rows, i1, d), &q[i0 * d..], (d, 1), k, (1, d), false);
}

/// `dst[..rows] = pb · m[..i1]`: a `[rows, i1]` block (rows of stride `t`) times the first `i1`
/// rows of a `[t, d]` matrix, into `rows` rows of `d`.
fn block_times(
    dst: &mut [f32],
    pb: &[f32],
    t: usize,
    (rows, i1): (usize, usize),
    d: usize,
    m: &[f32],
) {
    matmul(dst, d, (rows, d, i1), pb, (t, 1), m, (d, 1), false);
}

/// Causal attention with the rotary embedding applied to q and k, grouped key/value heads and a
/// key padding mask. Returns the output `[b, t, h * d]` and the per-row log-sum-exp `[b, h, t]`
/// that [`attention_backward`] needs.
pub fn attention_forward(s: &AttnShape, inp: &AttnInputs) -> (Vec<f32>, Vec<f32>) {
    inp.check(s);
    let (t, d) = (s.t, s.d);
    let scale = 1.0 / (d as f32).sqrt();
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = (0..s.b * s.h)
        .into_par_iter()
        .map(|task| {
            let (bi, hi) = (task / s.h, task % s.h);
            let g = hi / s.rep();
            let keep = &inp.keep[bi * t..][..t];
            let q = rope_head(inp.q, s.h, hi, bi, s, inp, scale);
            let k = rope_head(inp.k, s.kv, g, bi, s, inp, 1.0);
            let v = head_block(inp.v, s.kv, g, bi, s);
            let mut p = vec![0.0f32; t * t];
            let mut lse = vec![f32::INFINITY; t];
            let mut o = vec![0.0f32; t * d];
            for i0 in (0..t).step_by(QUERY_BLOCK) {
                let i1 = (i0 + QUERY_BLOCK).min(t);
                let rows = i1 - i0;
                let pb = &mut p[i0 * t..i1 * t];
                block_scores(pb, t, (i0, i1), d, &q, &k);
                for r in 0..rows {
                    lse[i0 + r] = softmax_causal_row(&mut pb[r * t..r * t + i1], keep, i0 + r);
                }
                block_times(&mut o[i0 * d..], pb, t, (rows, i1), d, &v);
            }
            (o, lse)
        })
        .collect();
    // Task `bi * h + head`: each batch row's heads are one run of tasks, scattered in parallel.
    let mut out = zeros(s.b * t * s.h * d);
    out.par_chunks_mut(t * s.h * d)
        .zip(blocks.par_chunks(s.h))
        .for_each(|(row, heads)| {
            for (head, (o, _)) in heads.iter().enumerate() {
                scatter_head(row, o, s.h, head, s);
            }
        });
    let lse = blocks.iter().flat_map(|(_, l)| l.iter().copied()).collect();
    (out, lse)
}

/// One (batch row, key/value head) task's gradients: dq of each query head sharing the key/value
/// head, then dk and dv.
type HeadGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Gradients of [`attention_forward`] with respect to q, k and v (before the rotary embedding),
/// from the upstream gradient `dout` and the forward's output and log-sum-exp. Probabilities are
/// recomputed per head rather than kept from the forward pass.
pub fn attention_backward(
    s: &AttnShape,
    inp: &AttnInputs,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    inp.check(s);
    let (t, d) = (s.t, s.d);
    assert_eq!(out.len(), s.b * t * s.h * d, "attention backward: out");
    assert_eq!(dout.len(), out.len(), "attention backward: dout");
    assert_eq!(lse.len(), s.b * s.h * t, "attention backward: lse");
    let scale = 1.0 / (d as f32).sqrt();
    let rep = s.rep();
    // One task per (batch row, key/value head): it owns that head's dk and dv, so the sums over
    // the query heads sharing it are taken in a fixed order.
    let blocks: Vec<HeadGrads> = (0..s.b * s.kv)
        .into_par_iter()
        .map(|task| {
            let (bi, g) = (task / s.kv, task % s.kv);
            let keep = &inp.keep[bi * t..][..t];
            let k = rope_head(inp.k, s.kv, g, bi, s, inp, 1.0);
            let v = head_block(inp.v, s.kv, g, bi, s);
            let mut dk = vec![0.0f32; t * d];
            let mut dv = vec![0.0f32; t * d];
            let mut dqs = Vec::with_capacity(rep);
            let mut p = vec![0.0f32; t * t];
            let mut dp = vec![0.0f32; t * t];
            for hi in g * rep..(g + 1) * rep {
                let q = rope_head(inp.q, s.h, hi, bi, s, inp, scale);
                let o = head_block(out, s.h, hi, bi, s);
                let dout_h = head_block(dout, s.h, hi, bi, s);
                let lse_h = &lse[(bi * s.h + hi) * t..][..t];
                let mut dq = vec![0.0f32; t * d];
                for i0 in (0..t).step_by(QUERY_BLOCK) {
                    let i1 = (i0 + QUERY_BLOCK).min(t);
                    let rows = i1 - i0;
                    let pb = &mut p[i0 * t..i1 * t];
                    block_scores(pb, t, (i0, i1), d, &q, &k);
                    for r in 0..rows {
                        let row = &mut pb[r * t..r * t + i1];
                        softmax_row_from_lse(row, keep, i0 + r, lse_h[i0 + r]);
                    }
                    // dv[..i1] += p^T · dout
                    let dout_b = &dout_h[i0 * d..];
                    matmul(&mut dv, d, (i1, d, rows), pb, (1, t), dout_b, (d, 1), true);
                    // dp = dout · v^T
                    let dpb = &mut dp[i0 * t..i1 * t];
                    matmul(dpb, t, (rows, i1, d), dout_b, (d, 1), &v, (1, d), false);
                    // ds = p * (dp - rowsum(dout * o)), in place in dp
                    for r in 0..rows {
                        let i = i0 + r;
                        let di: f32 = dout_h[i * d..][..d]
                            .iter()
                            .zip(&o[i * d..][..d])
                            .map(|(a, b)| a * b)
                            .sum();
                        let (pr, dr) = (&pb[r * t..r * t + i1], &mut dpb[r * t..r * t + i1]);
                        for j in 0..i1 {
                            dr[j] = pr[j] * (dr[j] - di);
                        }
                    }
                    // dq = ds · k (the scale folded into q and the rotation come after)
                    block_times(&mut dq[i0 * d..], dpb, t, (rows, i1), d, &k);
                    // dk[..i1] += ds^T · q (q already carries the scale)
                    matmul(
                        &mut dk,
                        d,
                        (i1, d, rows),
                        dpb,
                        (1, t),
                        &q[i0 * d..],
                        (d, 1),
                        true,
                    );
                }
                rope_head_backward(&mut dq, bi, s, inp, scale);
                dqs.push(dq);
            }
            rope_head_backward(&mut dk, bi, s, inp, 1.0);
            (dqs, dk, dv)
        })
        .collect();
    // Task `bi * kv + g`: each batch row's key/value heads are one run of tasks.
    let mut dq = zeros(s.b * t * s.h * d);
    let mut dk = zeros(s.b * t * s.kv * d);
    let mut dv = zeros(s.b * t * s.kv * d);
    dq.par_chunks_mut(t * s.h * d)
        .zip(dk.par_chunks_mut(t * s.kv * d))
        .zip(dv.par_chunks_mut(t * s.kv * d))
        .zip(blocks.par_chunks(s.kv))
        .for_each(|(((dq, dk), dv), groups)| {
            for (g, (dqs, dkb, dvb)) in groups.iter().enumerate() {
                for (r, dqb) in dqs.iter().enumerate() {
                    scatter_head(dq, dqb, s.h, g * rep + r, s);
                }
                scatter_head(dk, dkb, s.kv, g, s);
                scatter_head(dv, dvb, s.kv, g, s);
            }
        });
    (dq, dk, dv)
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, accumulated in f32 as transformers does.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|x| x * x).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

/// RMSNorm over the last axis: `y = x / rms(x) * gamma`, rows of `gamma.len()`.
pub fn rms_norm_forward(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let d = gamma.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "rms_norm: width");
    let mut y = zeros(x.len());
    y.par_chunks_mut(ROWS_PER_CHUNK * d)
        .zip(x.par_chunks(ROWS_PER_CHUNK * d))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                let r = inv_rms(xr, eps);
                for ((y, x), g) in yr.iter_mut().zip(xr).zip(gamma) {
                    *y = x * r * g;
                }
            }
        });
    y
}

/// Gradients of [`rms_norm_forward`]: `(dx, dgamma)`.
pub fn rms_norm_backward(x: &[f32], gamma: &[f32], eps: f32, dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && dy.len() == x.len(),
        "rms_norm backward: shapes"
    );
    let mut dx = zeros(x.len());
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS_PER_CHUNK * d)
        .zip(x.par_chunks(ROWS_PER_CHUNK * d))
        .zip(dy.par_chunks(ROWS_PER_CHUNK * d))
        .map(|((dxc, xc), dyc)| {
            let mut dg = vec![0.0f32; d];
            for ((dxr, xr), dyr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(dyc.chunks(d)) {
                let r = inv_rms(xr, eps);
                // dx = r * gamma * dy - x * r^3 / d * sum(gamma * dy * x)
                let dot: f32 = xr
                    .iter()
                    .zip(dyr)
                    .zip(gamma)
                    .map(|((x, dy), g)| x * dy * g)
                    .sum();
                let c = dot * r * r * r / d as f32;
                for j in 0..d {
                    dxr[j] = r * gamma[j] * dyr[j] - xr[j] * c;
                    dg[j] += dyr[j] * xr[j] * r;
                }
            }
            dg
        })
        .collect();
    let mut dgamma = vec![0.0f32; d];
    for p in &partials {
        for (a, b) in dgamma.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dgamma)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// SwiGLU's gate: `silu(gate) * up`, element-wise.
pub fn swiglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "swiglu: shapes");
    let mut y = zeros(gate.len());
    y.par_chunks_mut(ELEMS_PER_CHUNK)
        .zip(gate.par_chunks(ELEMS_PER_CHUNK))
        .zip(up.par_chunks(ELEMS_PER_CHUNK))
        .for_each(|((yc, gc), uc)| {
            for ((y, g), u) in yc.iter_mut().zip(gc).zip(uc) {
                *y = g * sigmoid(*g) * u;
            }
        });
    y
}

/// Gradients of [`swiglu_forward`]: `(dgate, dup)`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        gate.len() == up.len() && dy.len() == up.len(),
        "swiglu backward: shapes"
    );
    let mut dg = zeros(gate.len());
    let mut du = zeros(gate.len());
    dg.par_chunks_mut(ELEMS_PER_CHUNK)
        .zip(du.par_chunks_mut(ELEMS_PER_CHUNK))
        .zip(gate.par_chunks(ELEMS_PER_CHUNK))
        .zip(
            up.par_chunks(ELEMS_PER_CHUNK)
                .zip(dy.par_chunks(ELEMS_PER_CHUNK)),
        )
        .for_each(|(((dgc, duc), gc), (uc, dyc))| {
            for i in 0..gc.len() {
                let (g, u, dy) = (gc[i], uc[i], dyc[i]);
                let sg = sigmoid(g);
                duc[i] = dy * g * sg;
                dgc[i] = dy * u * sg * (1.0 + g * (1.0 - sg));
            }
        });
    (dg, du)
}

#[cfg(test)]
mod tests {
    //! Each kernel against a plain, obviously-correct version of the same maths (f64, no
    //! tricks), and each backward against central finite differences of its forward.
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n).map(|_| lcg(seed)).collect()
    }

    struct Case {
        s: AttnShape,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        cos: Vec<f32>,
        sin: Vec<f32>,
        keep: Vec<f32>,
    }

    impl Case {
        fn new(b: usize, t: usize, h: usize, kv: usize, d: usize, pads: &[usize]) -> Self {
            let mut seed = 7;
            let s = AttnShape { b, t, h, kv, d };
            let mut keep = vec![1.0f32; b * t];
            let mut cos = vec![0.0f32; b * t * d];
            let mut sin = vec![0.0f32; b * t * d];
            for bi in 0..b {
                for i in 0..pads[bi] {
                    keep[bi * t + i] = 0.0;
                }
                for i in 0..t {
                    let pos = i.saturating_sub(pads[bi]) as f32;
                    for j in 0..d / 2 {
                        let f = pos / 10000f32.powf(2.0 * j as f32 / d as f32);
                        for jj in [j, j + d / 2] {
                            cos[(bi * t + i) * d + jj] = f.cos();
                            sin[(bi * t + i) * d + jj] = f.sin();
                        }
                    }
                }
            }
            Self {
                q: rand_vec(b * t * h * d, &mut seed),
                k: rand_vec(b * t * kv * d, &mut seed),
                v: rand_vec(b * t * kv * d, &mut seed),
                cos,
                sin,
                keep,
                s,
            }
        }

        fn inputs(&self) -> AttnInputs<'_> {
            AttnInputs {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                cos: &self.cos,
                sin: &self.sin,
                keep: &self.keep,
            }
        }

        /// The textbook computation in f64: rotate, scores, mask, softmax, weighted sum.
        fn reference(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
            let AttnShape { b, t, h, kv, d } = self.s;
            let rot = |x: &[f32], heads: usize, bi: usize, hd: usize, i: usize| -> Vec<f64> {
                let row = &x[((bi * t + i) * heads + hd) * d..][..d];
                let c = &self.cos[(bi * t + i) * d..][..d];
                let sn = &self.sin[(bi * t + i) * d..][..d];
                (0..d)
                    .map(|j| {
                        let r = if j < d / 2 {
                            -row[j + d / 2]
                        } else {
                            row[j - d / 2]
                        };
                        f64::from(row[j]) * f64::from(c[j]) + f64::from(r) * f64::from(sn[j])
                    })
                    .collect()
            };
            let mut out = vec![0.0f64; b * t * h * d];
            for bi in 0..b {
                for hi in 0..h {
                    let g = hi / (h / kv);
                    for i in 0..t {
                        let qi = rot(q, h, bi, hi, i);
                        let vis: Vec<usize> =
                            (0..=i).filter(|&j| self.keep[bi * t + j] != 0.0).collect();
                        if vis.is_empty() {
                            continue;
                        }
                        let sc: Vec<f64> = vis
                            .iter()
                            .map(|&j| {
                                let kj = rot(k, kv, bi, g, j);
                                qi.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>()
                                    / (d as f64).sqrt()
                            })
                            .collect();
                        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                        for (&j, sj) in vis.iter().zip(&sc) {
                            let p = (sj - m).exp() / z;
                            for c in 0..d {
                                out[((bi * t + i) * h + hi) * d + c] +=
                                    p * f64::from(v[((bi * t + j) * kv + g) * d + c]);
                            }
                        }
                    }
                }
            }
            out
        }
    }

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn attention_matches_the_textbook_computation() {
        // Grouped heads (4 query heads on 2 key/value heads) and left padding of 0 and 3.
        let c = Case::new(2, 9, 4, 2, 8, &[0, 3]);
        let (out, _) = attention_forward(&c.s, &c.inputs());
        let want = c.reference(&c.q, &c.k, &c.v);
        let diff = max_diff(&out, &want);
        assert!(diff < 1e-5, "max diff {diff}");
        // Padding query rows come out as zeros.
        let row = &out[(9 * 4 * 8)..][..4 * 8];
        assert!(row.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn attention_over_several_query_blocks_matches_too() {
        let c = Case::new(1, 2 * QUERY_BLOCK + 22, 2, 1, 8, &[5]);
        let (out, _) = attention_forward(&c.s, &c.inputs());
        let diff = max_diff(&out, &c.reference(&c.q, &c.k, &c.v));
        assert!(diff < 1e-5, "max diff {diff}");
        backward_matches_finite_differences(&Case::new(1, QUERY_BLOCK + 6, 2, 1, 4, &[3]), 37);
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let c = Case::new(2, 6, 4, 2, 4, &[0, 2]);
        backward_matches_finite_differences(&c, 7);
        // Padding keys get no gradient.
        let inp = c.inputs();
        let (out, lse) = attention_forward(&c.s, &inp);
        let (_, dk, _) = attention_backward(&c.s, &inp, &out, &lse, &out);
        let pad_key = &dk[(6 * 2 * 4)..][..2 * 4];
        assert!(pad_key.iter().all(|&x| x == 0.0), "{pad_key:?}");
    }

    /// Asserts that `grad[i]` is the central finite difference (step `h`) of `loss` in `v[i]`,
    /// within `tol`, for each `i` of `at`.
    fn assert_finite_differences(
        what: &str,
        v: &[f32],
        grad: &[f32],
        at: impl Iterator<Item = usize>,
        (h, tol): (f32, f64),
        loss: impl Fn(&[f32]) -> f64,
    ) {
        for i in at {
            let (mut up, mut down) = (v.to_vec(), v.to_vec());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up) - loss(&down)) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(grad[i])).abs() < tol,
                "{what}[{i}]: finite difference {fd} vs {}",
                grad[i]
            );
        }
    }

    fn backward_matches_finite_differences(c: &Case, stride: usize) {
        let inp = c.inputs();
        let (out, lse) = attention_forward(&c.s, &inp);
        // Loss = sum(out * w) for a fixed random w: its gradient wrt out is w.
        let mut seed = 99;
        let w = rand_vec(out.len(), &mut seed);
        let (dq, dk, dv) = attention_backward(&c.s, &inp, &out, &lse, &w);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            c.reference(q, k, v)
                .iter()
                .zip(&w)
                .map(|(a, b)| a * f64::from(*b))
                .sum()
        };
        let fd = (1e-2, 2e-3);
        let every = |n: usize| (0..n).step_by(stride);
        assert_finite_differences("dq", &c.q, &dq, every(dq.len()), fd, |q| {
            loss(q, &c.k, &c.v)
        });
        assert_finite_differences("dk", &c.k, &dk, every(dk.len()), fd, |k| {
            loss(&c.q, k, &c.v)
        });
        assert_finite_differences("dv", &c.v, &dv, every(dv.len()), fd, |v| {
            loss(&c.q, &c.k, v)
        });
    }

    #[test]
    fn rms_norm_and_its_gradients() {
        let mut seed = 3;
        let (n, d) = (130, 12); // more rows than one chunk
        let x = rand_vec(n * d, &mut seed);
        let gamma = rand_vec(d, &mut seed);
        let eps = 1e-5f32;
        let reference = |x: &[f32], gamma: &[f32]| -> Vec<f64> {
            x.chunks(d)
                .flat_map(|r| {
                    let ms: f64 = r.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / d as f64;
                    let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                    r.iter()
                        .zip(gamma)
                        .map(move |(v, g)| f64::from(*v) * inv * f64::from(*g))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let y = rms_norm_forward(&x, &gamma, eps);
        assert!(max_diff(&y, &reference(&x, &gamma)) < 1e-5);
        let w = rand_vec(n * d, &mut seed);
        let (dx, dg) = rms_norm_backward(&x, &gamma, eps, &w);
        let loss = |x: &[f32], g: &[f32]| -> f64 {
            reference(x, g)
                .iter()
                .zip(&w)
                .map(|(a, b)| a * f64::from(*b))
                .sum()
        };
        let at = (0..x.len()).step_by(17);
        assert_finite_differences("dx", &x, &dx, at, (1e-3, 1e-3), |x| loss(x, &gamma));
        assert_finite_differences("dgamma", &gamma, &dg, 0..d, (1e-3, 1e-2), |g| loss(&x, g));
    }

    #[test]
    fn swiglu_and_its_gradients() {
        let mut seed = 5;
        let n = ELEMS_PER_CHUNK + 100; // two chunks
        let g: Vec<f32> = rand_vec(n, &mut seed).iter().map(|x| x * 4.0).collect();
        let u = rand_vec(n, &mut seed);
        let y = swiglu_forward(&g, &u);
        let silu = |x: f64| x / (1.0 + (-x).exp());
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(a, b)| silu(f64::from(*a)) * f64::from(*b))
            .collect();
        assert!(max_diff(&y, &want) < 1e-5);
        let dy = rand_vec(n, &mut seed);
        let (dg, du) = swiglu_backward(&g, &u, &dy);
        let h = 1e-3f64;
        for i in (0..n).step_by(997) {
            let (a, b, w) = (f64::from(g[i]), f64::from(u[i]), f64::from(dy[i]));
            let fd_g = (silu(a + h) - silu(a - h)) / (2.0 * h) * b * w;
            assert!((fd_g - f64::from(dg[i])).abs() < 1e-4, "dgate[{i}]");
            assert!((silu(a) * w - f64::from(du[i])).abs() < 1e-5, "dup[{i}]");
        }
    }

    #[test]
    fn pool_products_match_the_definition_for_plain_and_transposed_operands() {
        let mut seed = 11;
        // Large enough for gemm to split the work over the pool, with ragged edges.
        let (m, n, k) = (67, 129, 300);
        let a = rand_vec(m * k, &mut seed); // m x k, row-major
        let b = rand_vec(k * n, &mut seed); // k x n, row-major
        let want: Vec<f64> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..k)
                    .map(|l| f64::from(a[i * k + l]) * f64::from(b[l * n + j]))
                    .sum()
            })
            .collect();
        assert!(max_diff(&matmul_new((m, n, k), &a, (k, 1), &b, (n, 1)), &want) < 1e-4);
        // The same product from transposed storage: aᵀ stored k x m, bᵀ stored n x k.
        let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
        assert!(max_diff(&matmul_new((m, n, k), &at, (1, m), &bt, (1, k)), &want) < 1e-4);
        // Empty depth gives zeros; an empty output gives nothing.
        assert_eq!(
            matmul_new((2, 3, 0), &[], (0, 1), &[], (3, 1)),
            vec![0.0; 6]
        );
        assert!(matmul_new((0, 3, 4), &[], (4, 1), &b, (n, 1)).is_empty());
    }

    #[test]
    fn vectorisable_exp_is_as_close_as_the_library_one() {
        let mut worst = 0.0f64;
        let mut worst_lib = 0.0f64;
        for i in 0..=350_000 {
            let x = -87.0 + 175.0 * i as f32 / 350_000.0;
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - want).abs() / want);
            worst_lib = worst_lib.max((f64::from(x.exp()) - want).abs() / want);
        }
        assert!(
            worst < 3e-7,
            "relative error {worst:e} (f32::exp: {worst_lib:e})"
        );
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 2e-38 && exp(-1000.0) >= 0.0);
        assert!(exp(f32::NEG_INFINITY) < 2e-38);
        assert!(exp(f32::NAN).is_nan());
        let xs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: f64 = xs.iter().map(|&x| f64::from(x)).sum();
        assert!((f64::from(sum_lanes(&xs)) - want).abs() < 1e-4);
    }
}
