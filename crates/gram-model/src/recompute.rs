//! Activation checkpointing (gram-train's `--recompute`): while a forward pass is recorded
//! ([`record`]), the decoder layers that [`crate::model::Decoder`] runs as its trunk (all but
//! the last layer under `forward_last`, all under `forward`) run without autodiff, keeping only
//! each layer's input; the rest of the pass starts from their output as a fresh leaf. The
//! backward pass ([`Tape::backward`]) then runs the loss's backward, and walks the trunk from
//! the top down: each layer's forward again, with autodiff, from its kept input, and its
//! backward from the gradient of its output. Peak memory holds the layer inputs and one
//! layer's activations instead of every layer's; the price is a second forward of the trunk.

use std::cell::RefCell;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

use crate::model::DecoderLayer;
use crate::ops::{CausalMask, Rope};

thread_local! {
    /// The tape of the pass [`record`] runs on this thread.
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// One checkpointed run of consecutive layers.
struct Segment {
    /// The layers (on the autodiff device).
    layers: Vec<DecoderLayer>,
    /// Each layer's input, without autodiff.
    inputs: Vec<Tensor<3>>,
    /// What entered the segment (carries the gradient on to the embedding when it trains).
    input: Tensor<3>,
    /// The leaf the rest of the pass started from.
    output: Tensor<3>,
    rope: Rope,
    mask: CausalMask,
}

/// What a checkpointed forward pass left for its backward pass.
#[derive(Default)]
pub struct Tape {
    segments: Vec<Segment>,
}

/// Runs `f` (a forward pass to a loss) with the decoder's trunk checkpointed when `on`; returns
/// its result and the tape [`Tape::backward`] needs (empty when off).
pub fn record<R>(on: bool, f: impl FnOnce() -> R) -> (R, Tape) {
    if !on {
        return (f(), Tape::default());
    }
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            TAPE.with(|t| t.borrow_mut().take());
        }
    }
    TAPE.with(|t| *t.borrow_mut() = Some(Tape::default()));
    let clear = Clear;
    let out = f();
    let tape = TAPE.with(|t| t.borrow_mut().take()).unwrap_or_default();
    drop(clear);
    (out, tape)
}

/// Whether a checkpointed pass is being recorded on this thread.
pub fn recording() -> bool {
    TAPE.with(|t| t.borrow().is_some())
}

/// Runs `layers` over `x`: normally, or, while recording on an autodiff device, without
/// autodiff, keeping their inputs on the tape and returning their output as a new leaf.
pub(crate) fn run_layers(
    layers: &[DecoderLayer],
    x: Tensor<3>,
    rope: &Rope,
    mask: &CausalMask,
) -> Tensor<3> {
    if layers.is_empty() || !recording() || !x.device().is_autodiff() {
        return layers.iter().fold(x, |x, l| l.forward(x, rope, mask));
    }
    let (rope_i, mask_i) = (rope.inner(), mask.inner());
    let mut inputs = Vec::with_capacity(layers.len());
    let mut h = x.clone().inner();
    for layer in layers {
        inputs.push(h.clone());
        h = layer.valid().forward(h, &rope_i, &mask_i);
    }
    let output = h.autodiff().require_grad();
    let segment = Segment {
        layers: layers.to_vec(),
        inputs,
        input: x,
        output: output.clone(),
        rope: rope.clone(),
        mask: mask.clone(),
    };
    TAPE.with(|t| {
        if let Some(tape) = t.borrow_mut().as_mut() {
            tape.segments.push(segment);
        }
    });
    output
}

impl Tape {
    /// The gradients of `model`'s parameters of `loss`: the loss's backward pass, then each
    /// checkpointed segment's, top down.
    pub fn backward<M: Module>(self, loss: Tensor<1>, model: &M) -> GradientsParams {
        let mut grads = loss.backward();
        let outs: Vec<Option<Tensor<3>>> = self
            .segments
            .iter()
            .map(|s| s.output.grad(&grads))
            .collect();
        let mut params = GradientsParams::from_module(&mut grads, model);
        for (seg, g) in self.segments.into_iter().zip(outs).rev() {
            if let Some(g) = g {
                seg.backward(g, model, &mut params);
            }
        }
        params
    }
}

impl Segment {
    /// Recomputes the segment layer by layer from the top, adding each layer's parameter
    /// gradients (and the embedding's, through `input`) into `params`; `g` is the gradient of
    /// the segment's output.
    fn backward<M: Module>(self, mut g: Tensor<3>, model: &M, params: &mut GradientsParams) {
        let trains: Vec<bool> = self.layers.iter().map(trains).collect();
        let input_tracked = self.input.is_tracked();
        for (i, (layer, x)) in self.layers.iter().zip(self.inputs).enumerate().rev() {
            let below = input_tracked || trains[..i].iter().any(|&t| t);
            if !trains[i] && !below {
                return;
            }
            let x = x.autodiff().require_grad();
            let y = layer.forward(x.clone(), &self.rope, &self.mask);
            let mut lg = (y * g.clone()).sum().backward();
            add_into(params, GradientsParams::from_module(&mut lg, layer), layer);
            match x.grad(&lg) {
                Some(next) => g = next,
                None => return,
            }
        }
        if input_tracked {
            let mut eg = (self.input * g.autodiff()).sum().backward();
            add_into(params, GradientsParams::from_module(&mut eg, model), model);
        }
    }
}

/// Whether any parameter of a layer takes gradients.
fn trains(layer: &DecoderLayer) -> bool {
    struct Any(bool);
    impl ModuleVisitor for Any {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0 |= p.val().is_require_grad();
        }
    }
    let mut v = Any(false);
    layer.visit(&mut v);
    v.0
}

/// Adds the gradients in `more` (of `module`'s parameters) into `params`.
fn add_into<M: Module>(params: &mut GradientsParams, mut more: GradientsParams, module: &M) {
    struct Add<'a> {
        params: &'a mut GradientsParams,
        more: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Add<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(g) = self.more.remove::<D>(p.id) {
                let sum = match self.params.remove::<D>(p.id) {
                    Some(prev) => prev + g,
                    None => g,
                };
                self.params.register::<D>(p.id, sum);
            }
        }
    }
    module.visit(&mut Add {
        params,
        more: &mut more,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use gram_core::{LoraConfig, Target};

    use crate::CausalLm;
    use crate::lora::{self, Trainable};
    use crate::testing::tiny_config;

    /// Every parameter gradient of a model as `(id, values)`.
    fn flat(model: &CausalLm, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
        struct Collect<'a>(&'a GradientsParams, Vec<(String, Vec<f32>)>);
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                if let Some(g) = self.0.get::<D>(p.id) {
                    let v = g.into_data().try_to_vec::<f32>().expect("f32");
                    self.1.push((p.id.to_string(), v));
                }
            }
        }
        let mut c = Collect(grads, Vec::new());
        model.visit(&mut c);
        c.1
    }

    /// The loss of both heads the objectives use (every position's logits; the last
    /// position's label logits), and its parameter gradients, with or without recompute.
    fn run(model: &CausalLm, on: bool, device: &Device) -> (f32, Vec<(String, Vec<f32>)>) {
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(vec![0i64, 5, 9, 11, 3, 7, 21, 2, 30, 8], [2, 5]),
            device,
        );
        let mask = Tensor::<2, Int>::from_data(
            TensorData::new(vec![0i64, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 5]),
            device,
        );
        let w = Tensor::<3>::from_data(
            TensorData::new(
                (0..400)
                    .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
                    .collect::<Vec<_>>(),
                [2, 5, 40],
            ),
            device,
        );
        let (loss, tape) = record(on, || {
            let all = (model.forward(ids.clone(), mask.clone()) * w).sum();
            let last = model.last_logits(ids.clone(), mask.clone(), &[4, 7]);
            all + (last * Tensor::<2>::from_floats([[1.0, -2.0], [0.5, 3.0]], device)).sum()
        });
        let value = loss.clone().into_scalar::<f32>();
        // Two passes through the layers below the last (forward_last) and through all (forward).
        assert_eq!(tape.segments.len(), if on { 2 } else { 0 });
        let grads = tape.backward(loss, model);
        (value, flat(model, &grads))
    }

    #[test]
    fn recompute_gives_the_same_loss_and_gradients() {
        let device = Device::flex().autodiff();
        for (tied, setting) in [
            (false, "full"),
            (true, "full"),
            (true, "lora"),
            (false, "top-1"),
        ] {
            device.seed(7);
            let mut model = CausalLm::init(&tiny_config(tied), &device);
            let trainable = match setting {
                "lora" => {
                    let cfg = LoraConfig {
                        rank: 2,
                        alpha: 4.0,
                        dropout: 0.0,
                        targets: Target::ALL.to_vec(),
                        rslora: false,
                        layers: None,
                    };
                    lora::attach(
                        &mut model.model,
                        &cfg,
                        lora::Init::Fresh(7),
                        None,
                        "test",
                        &device,
                    )
                    .expect("attach");
                    // Non-zero B, so that A's gradients are not all zero.
                    for l in &mut model.model.layers {
                        let b = &mut l.self_attn.v_proj.lora.as_mut().expect("lora").b;
                        let v = Tensor::random(b.dims(), Distribution::Normal(0.0, 0.5), &device);
                        *b = Param::initialized(b.id, crate::device::trainable(v));
                    }
                    Trainable {
                        lora: true,
                        ..Trainable::default()
                    }
                }
                "top-1" => Trainable {
                    top_layers: Some(1),
                    ..Trainable::default()
                },
                _ => Trainable::default(),
            };
            let model = trainable.apply(model, 2).expect("freeze");
            let (l0, g0) = run(&model, false, &device);
            let (l1, g1) = run(&model, true, &device);
            assert!(
                (l0 - l1).abs() <= 1e-6 * l0.abs().max(1.0),
                "{setting}: loss {l0} vs {l1}"
            );
            assert_eq!(
                g0.len(),
                g1.len(),
                "{setting} (tied {tied}): parameters with gradients"
            );
            assert!(!g0.is_empty());
            for ((id, a), (_, b)) in g0.iter().zip(&g1) {
                let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
                let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-6 * scale,
                    "{setting} (tied {tied}): parameter {id}: max diff {diff} of {scale}"
                );
            }
        }
    }
}
