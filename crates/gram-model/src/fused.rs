//! Fused operations for burn's CPU backend (flex), with hand-written backward passes: causal
//! attention with the rotary embedding inside, RMSNorm, SwiGLU and the linear projections. They are registered through
//! burn's backend-extension API (`#[backend_extension]`), so they take and return ordinary
//! `Tensor`s and take part in autodiff like any other operation; the arithmetic is in
//! [`crate::kernels`].
//!
//! Only the CPU gets them: [`crate::ops`] calls them on burn's CPU backend and composes burn's
//! primitives elsewhere (burn fuses element-wise work on wgpu itself).

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::prelude::*;
use burn::tensor::Shape;

use crate::kernels::{self, AttnInputs, AttnShape};

/// The fused operations, per backend.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// Causal attention with RoPE applied to q and k and a key padding mask.
    ///
    /// # Shapes
    /// - `q`: `[b, t, heads * d]`; `k`, `v`: `[b, t, kv_heads * d]`
    /// - `cos`, `sin`: `[b, t, d]`; `keep`: `[b, t]` (1 real token, 0 padding)
    /// - output: `[b, t, heads * d]` (rows of padding queries are zeros)
    #[allow(clippy::too_many_arguments)]
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        heads: usize,
        kv_heads: usize,
    ) -> FloatTensor<Self>;

    /// RMSNorm over the last axis: `x / sqrt(mean(x^2) + eps) * gamma`.
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;

    /// `silu(gate) * up`.
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `x · w` over the last axis of `x`: `x` is `[.., d_in]`, `w` is `[d_in, d_out]` (the layout
    /// of burn's `Linear` weight); the output is `[.., d_out]`.
    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// A contiguous copy (or the tensor itself when already contiguous).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

/// The f32 elements of a contiguous tensor.
fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("gram-model's fused CPU operations run on contiguous f32 tensors")
}

fn shape(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// The contiguous operands of one attention call and its shape.
#[derive(Clone, Debug)]
struct Attn {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    cos: FlexTensor,
    sin: FlexTensor,
    keep: FlexTensor,
    s: AttnShape,
}

impl Attn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        cos: &FlexTensor,
        sin: &FlexTensor,
        keep: &FlexTensor,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        let dims = shape(q);
        assert_eq!(
            dims.num_dims(),
            3,
            "fused attention: q must be [batch, seq, heads * head_dim]"
        );
        let s = AttnShape {
            b: dims[0],
            t: dims[1],
            h: heads,
            kv: kv_heads,
            d: dims[2] / heads,
        };
        Self {
            q: contiguous(q),
            k: contiguous(k),
            v: contiguous(v),
            cos: contiguous(cos),
            sin: contiguous(sin),
            keep: contiguous(keep),
            s,
        }
    }

    fn inputs(&self) -> AttnInputs<'_> {
        AttnInputs {
            q: f32s(&self.q),
            k: f32s(&self.k),
            v: f32s(&self.v),
            cos: f32s(&self.cos),
            sin: f32s(&self.sin),
            keep: f32s(&self.keep),
        }
    }

    /// Output and log-sum-exp (as tensors).
    fn forward(&self) -> (FlexTensor, FlexTensor) {
        let (out, lse) = kernels::attention_forward(&self.s, &self.inputs());
        let s = &self.s;
        (
            tensor(out, shape(&self.q)),
            tensor(lse, Shape::new([s.b, s.h, s.t])),
        )
    }
}

impl FusedOps for Flex {
    fn fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        keep: FlexTensor,
        heads: usize,
        kv_heads: usize,
    ) -> FlexTensor {
        Attn::new(&q, &k, &v, &cos, &sin, &keep, heads, kv_heads)
            .forward()
            .0
    }

    fn fused_rms_norm(x: FlexTensor, gamma: FlexTensor, eps: f64) -> FlexTensor {
        let (x, gamma) = (contiguous(&x), contiguous(&gamma));
        tensor(
            kernels::rms_norm_forward(f32s(&x), f32s(&gamma), eps as f32),
            shape(&x),
        )
    }

    fn fused_swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let (gate, up) = (contiguous(&gate), contiguous(&up));
        tensor(
            kernels::swiglu_forward(f32s(&gate), f32s(&up)),
            shape(&gate),
        )
    }

    fn fused_linear(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (x, w) = (contiguous(&x), contiguous(&w));
        let (rows, d_in, d_out) = linear_dims(&x, &w);
        let mut dims = shape(&x);
        let last = dims.num_dims() - 1;
        dims[last] = d_out;
        tensor(
            kernels::matmul_new(
                (rows, d_out, d_in),
                f32s(&x),
                (d_in, 1),
                f32s(&w),
                (d_out, 1),
            ),
            dims,
        )
    }
}

/// Rows, input and output width of a linear map of `x` (`[.., d_in]`) by `w` (`[d_in, d_out]`).
fn linear_dims(x: &FlexTensor, w: &FlexTensor) -> (usize, usize, usize) {
    let (xs, ws) = (shape(x), shape(w));
    assert!(
        ws.num_dims() == 2 && xs.num_dims() >= 1 && xs[xs.num_dims() - 1] == ws[0],
        "fused linear: x {xs:?} does not match the weight {ws:?}"
    );
    let (d_in, d_out) = (ws[0], ws[1]);
    (xs.num_elements() / d_in.max(1), d_in, d_out)
}

/// Registers the gradient of a parent that takes part in autodiff; for one that does not (`None`)
/// `grad` (values shaped like `like`) is not computed.
fn register(
    grads: &mut Gradients,
    parent: Option<NodeId>,
    like: &FlexTensor,
    grad: impl FnOnce() -> Vec<f32>,
) {
    if let Some(id) = parent {
        grads.register::<Flex>(id, tensor(grad(), shape(like)));
    }
}

#[derive(Debug)]
struct AttentionBackward;

#[derive(Clone, Debug)]
struct AttentionState {
    attn: Attn,
    out: FlexTensor,
    lse: FlexTensor,
}

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let dout = contiguous(&grads.consume::<Flex>(&ops.node));
        let st = ops.state;
        let (dq, dk, dv) = kernels::attention_backward(
            &st.attn.s,
            &st.attn.inputs(),
            f32s(&st.out),
            f32s(&st.lse),
            f32s(&dout),
        );
        register(grads, node_q.map(|n| n.id), &st.attn.q, || dq);
        register(grads, node_k.map(|n| n.id), &st.attn.k, || dk);
        register(grads, node_v.map(|n| n.id), &st.attn.v, || dv);
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = (FlexTensor, FlexTensor, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma] = ops.parents;
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, gamma, eps) = ops.state;
        let (dx, dgamma) =
            kernels::rms_norm_backward(f32s(&x), f32s(&gamma), eps as f32, f32s(&dy));
        register(grads, node_x.map(|n| n.id), &x, || dx);
        register(grads, node_gamma.map(|n| n.id), &gamma, || dgamma);
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let (gate, up) = ops.state;
        let (dg, du) = kernels::swiglu_backward(f32s(&gate), f32s(&up), f32s(&dy));
        register(grads, node_gate.map(|n| n.id), &gate, || dg);
        register(grads, node_up.map(|n| n.id), &up, || du);
    }
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 2> for LinearBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, w) = ops.state;
        let (rows, d_in, d_out) = linear_dims(&x, &w);
        // dx = dy · wᵀ: wᵀ read through swapped strides.
        register(grads, node_x.map(|n| n.id), &x, || {
            kernels::matmul_new(
                (rows, d_in, d_out),
                f32s(&dy),
                (d_out, 1),
                f32s(&w),
                (1, d_out),
            )
        });
        // dw = xᵀ · dy, summed over every row.
        register(grads, node_w.map(|n| n.id), &w, || {
            kernels::matmul_new(
                (d_in, d_out, rows),
                f32s(&x),
                (1, d_in),
                f32s(&dy),
                (d_out, 1),
            )
        });
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        heads: usize,
        kv_heads: usize,
    ) -> FloatTensor<Self> {
        let attn = Attn::new(
            q.primitive(),
            k.primitive(),
            v.primitive(),
            cos.primitive(),
            sin.primitive(),
            keep.primitive(),
            heads,
            kv_heads,
        );
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) = attn.forward();
                let state = AttentionState {
                    attn,
                    out: out.clone(),
                    lse,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(attn.forward().0),
        }
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let (xp, gp) = (contiguous(x.primitive()), contiguous(gamma.primitive()));
        let out = Flex::fused_rms_norm(xp.clone(), gp.clone(), eps);
        match RmsNormBackward
            .prepare::<C>([x.node(), gamma.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, gp, eps), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (gp, upp) = (contiguous(gate.primitive()), contiguous(up.primitive()));
        let out = Flex::fused_swiglu(gp.clone(), upp.clone());
        match SwigluBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((gp, upp), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (xp, wp) = (contiguous(x.primitive()), contiguous(w.primitive()));
        let out = Flex::fused_linear(xp.clone(), wp.clone());
        match LinearBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, wp), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// [`FusedOps::fused_attention`] on tensors (CPU only; see [`crate::device::is_cpu`]).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    cos: Tensor<3>,
    sin: Tensor<3>,
    keep: Tensor<2>,
    heads: usize,
    kv_heads: usize,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        keep.into_dispatch(),
        heads,
        kv_heads,
    ))
}

/// [`FusedOps::fused_rms_norm`] on tensors (CPU only; see [`crate::device::is_cpu`]).
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        eps,
    ))
}

/// [`FusedOps::fused_swiglu`] on tensors (CPU only; see [`crate::device::is_cpu`]).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// [`FusedOps::fused_linear`] on tensors (CPU only; see [`crate::device::is_cpu`]).
pub fn linear<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}
