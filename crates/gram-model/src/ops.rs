//! The decoder's operations, in the manner of `candle_nn::ops`: RMSNorm, a linear map, SwiGLU and
//! causal attention with the rotary embedding, all over one activation layout (`[.., width]`:
//! `[batch, seq, width]` for the decoder, `[batch, width]` for a last row).
//!
//! Each op decides inside itself how it runs: on burn's CPU backend (flex, with or without
//! autodiff) through the fused kernels of [`crate::fused`] (hand-written forward and backward
//! passes), on every other backend (wgpu) through burn's composed operations, which burn fuses
//! there itself. Callers never choose; [`composed`] exists so that tests can run the same model
//! through the composed operations on the CPU and compare.

use std::cell::Cell;

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{silu, softmax};

use crate::{device, fused, rope};

thread_local! {
    /// Set while [`composed`] runs on this thread.
    static COMPOSED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every op of this module on burn's composed operations, whatever the device:
/// the reference the fused CPU kernels are tested against. The choice is made when an op runs
/// forward; its backward pass follows it.
pub fn composed<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPOSED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(COMPOSED.with(|c| c.replace(true)));
    f()
}

/// Whether ops on `device` run the fused CPU kernels.
fn fused_on(device: &Device) -> bool {
    device::is_cpu(device) && !COMPOSED.with(Cell::get)
}

/// RMSNorm over the last axis: `x / sqrt(mean(x^2) + eps) * gamma`.
///
/// # Shapes
/// - `x`: `[.., d]`; `gamma`: `[d]`; output: as `x`
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    if fused_on(&x.device()) {
        return fused::rms_norm(x, gamma, eps);
    }
    // burn's `RmsNorm::forward`, operation by operation.
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + eps).sqrt();
    (x / rms.cast(dtype)) * gamma.unsqueeze()
}

/// `x · weight (+ bias)` over the last axis; `weight` is `[d_in, d_out]` (burn's `Linear`
/// layout). On the CPU one matrix product over every row, however many leading axes `x` has.
///
/// # Shapes
/// - `x`: `[.., d_in]`; `bias`: `[d_out]`; output: `[.., d_out]`
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    if !fused_on(&x.device()) {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let y = fused::linear(x, weight);
    match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}

/// `silu(gate) * up`.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if fused_on(&gate.device()) {
        fused::swiglu(gate, up)
    } else {
        silu(gate) * up
    }
}

/// The rotary embedding of one batch: cos and sin tables at every token's position.
#[derive(Clone, Debug)]
pub struct Rope {
    /// `[batch, 1, seq, head_dim]` (broadcast over heads).
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    /// The tables of a left-padded batch (positions count real tokens only), rotating by
    /// `inv_freq`.
    ///
    /// # Shapes
    /// - `mask`: `[batch, seq]` (1 real token, 0 padding)
    pub fn new(mask: Tensor<2, Int>, inv_freq: &[f32]) -> Self {
        let inv = Tensor::<1>::from_data(
            TensorData::new(inv_freq.to_vec(), [inv_freq.len()]),
            &mask.device(),
        );
        let (cos, sin) = rope::cos_sin(rope::position_ids(mask), &inv);
        Self { cos, sin }
    }

    /// The head size the tables rotate.
    pub fn head_dim(&self) -> usize {
        self.cos.dims()[3]
    }

    /// The same tables without autodiff.
    pub fn inner(&self) -> Self {
        Self {
            cos: self.cos.clone().inner(),
            sin: self.sin.clone().inner(),
        }
    }
}

/// Which keys each query may read: causal, and never a padding key.
#[derive(Clone, Debug)]
pub struct CausalMask {
    /// `[batch, seq]`: 1 for a real token, 0 for padding (what the fused kernel reads).
    keep: Tensor<2>,
    /// `[batch, 1, seq, seq]`, true = hidden (what the composed path reads); built only when
    /// the composed path will run.
    hidden: Option<Tensor<4, Bool>>,
}

impl CausalMask {
    /// The mask of a left-padded batch.
    ///
    /// # Shapes
    /// - `mask`: `[batch, seq]` (1 real token, 0 padding)
    pub fn new(mask: Tensor<2, Int>) -> Self {
        let hidden = (!fused_on(&mask.device())).then(|| hidden_keys(mask.clone()));
        Self {
            keep: mask.float(),
            hidden,
        }
    }

    /// The same mask without autodiff.
    pub fn inner(&self) -> Self {
        Self {
            keep: self.keep.clone().inner(),
            hidden: self.hidden.clone().map(Tensor::inner),
        }
    }
}

/// `hidden[b, 0, i, j]`: key `j` is in the future of query `i`, or is padding.
fn hidden_keys(mask: Tensor<2, Int>) -> Tensor<4, Bool> {
    let [b, t] = mask.dims();
    // tril_mask is true outside the lower triangle: exactly the future keys (j > i).
    let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &mask.device())
        .reshape([1, 1, t, t])
        .expand([b, 1, t, t]);
    let pad = mask
        .equal_elem(0)
        .reshape([b, 1, 1, t])
        .expand([b, 1, t, t]);
    future.bool_or(pad)
}

/// Causal attention with grouped key/value heads: RoPE applied to `q` and `k`, scores scaled by
/// `1/sqrt(head_dim)`, padding keys and future keys hidden. Head counts follow from the widths
/// and the rotary tables' head size. Rows of padding queries are not meaningful (the fused
/// kernel writes zeros, the composed path a uniform average); nothing should read them.
///
/// # Shapes
/// - `q`: `[batch, seq, heads * head_dim]`; `k`, `v`: `[batch, seq, kv_heads * head_dim]`
/// - output: `[batch, seq, heads * head_dim]`
pub fn attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    rope: &Rope,
    mask: &CausalMask,
) -> Tensor<3> {
    let d = rope.head_dim();
    let [b, t, qw] = q.dims();
    let [_, _, kw] = k.dims();
    let (h, kv) = (qw / d, kw / d);
    if fused_on(&q.device()) {
        let cos = rope.cos.clone().reshape([b, t, d]);
        let sin = rope.sin.clone().reshape([b, t, d]);
        return fused::attention(q, k, v, cos, sin, mask.keep.clone(), h, kv);
    }
    let hidden = match &mask.hidden {
        Some(m) => m.clone(),
        None => hidden_keys(mask.keep.clone().int()),
    };
    let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, d]).swap_dims(1, 2);
    let q = rope::apply(heads(q, h), &rope.cos, &rope.sin);
    let k = rope::apply(heads(k, kv), &rope.cos, &rope.sin);
    let v = heads(v, kv);
    let (k, v) = if kv == h {
        (k, v)
    } else {
        let expand = |y: Tensor<4>| {
            y.unsqueeze_dim::<5>(2)
                .repeat_dim(2, h / kv)
                .reshape([b, h, t, d])
        };
        (expand(k), expand(v))
    };
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (d as f64).sqrt());
    // A large finite value rather than -inf: a fully masked row (a padding query) then softmaxes
    // to a uniform row instead of NaN, and its output is never read.
    let scores = scores.mask_fill(hidden.expand([b, h, t, t]), -1.0e30);
    softmax(scores, 3)
        .matmul(v)
        .swap_dims(1, 2)
        .reshape([b, t, h * d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 values")
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Each op's fused CPU kernel and its composed form agree, values and input gradients, and
    /// `composed` switches only while it runs.
    #[test]
    fn fused_and_composed_ops_agree() {
        let device = Device::flex().autodiff();
        device.seed(5);
        let rand = |dims: [usize; 3]| {
            Tensor::<3>::random(dims, Distribution::Normal(0.0, 1.0), &device).require_grad()
        };
        let (b, t, d) = (2, 5, 8);
        let (q, k, v) = (
            rand([b, t, 4 * d]),
            rand([b, t, 2 * d]),
            rand([b, t, 2 * d]),
        );
        let w =
            Tensor::<2>::random([4 * d, 3], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let gamma = Tensor::<1>::random([4 * d], Distribution::Normal(1.0, 0.1), &device);
        let bias = Tensor::<1>::random([3], Distribution::Normal(0.0, 1.0), &device);
        let keep = Tensor::<2, Int>::from_data(
            TensorData::new(vec![0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1], [b, t]),
            &device,
        );
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 100f32.powf(i as f32 / 4.0))
            .collect();
        let run = || {
            let (rope, mask) = (Rope::new(keep.clone(), &inv), CausalMask::new(keep.clone()));
            let a = attention(q.clone(), k.clone(), v.clone(), &rope, &mask);
            let n = rms_norm(a, gamma.clone(), 1e-6);
            let y = linear(n.clone(), w.clone(), Some(bias.clone()));
            let z = swiglu(y.clone(), y);
            // Padding queries' rows differ by design (zeros vs a uniform average): not read.
            let real = keep.clone().float().reshape([b, t, 1]);
            let out = z * real;
            let grads = out.clone().sum().backward();
            let g = |x: &Tensor<3>| values(x.grad(&grads).expect("gradient"));
            let gw = values(w.grad(&grads).expect("gradient"));
            (values(out), [g(&q), g(&k), g(&v), gw].concat())
        };
        let (out_f, grad_f) = run();
        let (out_c, grad_c) = composed(run);
        let (out_f2, _) = run();
        assert_eq!(
            out_f, out_f2,
            "composed() left the composed path switched on"
        );
        assert_ne!(out_f, out_c, "composed() did not switch paths");
        let (dv, dg) = (max_diff(&out_f, &out_c), max_diff(&grad_f, &grad_c));
        assert!(dv < 1e-4, "values differ by {dv}");
        assert!(dg < 1e-3, "gradients differ by {dg}");
    }
}
