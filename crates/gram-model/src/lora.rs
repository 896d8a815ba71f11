//! Parameter-efficient training: LoRA adapters on the decoder's projections, and which
//! parameters of a model train at all.
//!
//! The adapter is PEFT's, unmerged: `y = x·W + scale · dropout(x)·A·B` with `A` `[in, r]` and
//! `B` `[r, out]` (PEFT's `lora_A` / `lora_B` transposed into burn's `Linear` layout), `B`
//! starting at zero and `A` as PEFT draws it. Not burn's `apply_lora`, which materialises
//! `W + scale·A·B` in every forward: PEFT's dropout acts on the adapter's input alone, and with
//! the update kept apart the backward pass costs `r·(in + out)` per row for the adapter instead
//! of a full `[in, out]` weight gradient.

use std::collections::BTreeMap;

use burn::module::{Module, Param, ParamGroup, ParamId};
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use gram_core::F32Tensor;
use gram_core::adapter::{Adapter, LoraConfig, LoraPair, Target, factor_keys};

use crate::error::{Error, Result};
use crate::load::ParamIds;
use crate::model::{Decoder, DecoderLayer, Proj};
use crate::ops;

/// The low-rank update of one projection.
#[derive(Module, Debug)]
pub struct Lora {
    /// Down-projection, `[in, rank]`.
    pub a: Param<Tensor<2>>,
    /// Up-projection, `[rank, out]`.
    pub b: Param<Tensor<2>>,
    /// On the adapter's input, while training.
    pub dropout: Dropout,
    /// `alpha / rank` (or `alpha / sqrt(rank)`).
    #[module(skip)]
    pub scale: f64,
}

impl Lora {
    /// `scale · dropout(x)·A·B` (the scale applied to `B`, `[rank, out]`, rather than to the
    /// `[.., out]` product: one pass over a small matrix instead of a large one).
    ///
    /// # Shapes
    /// - `x`: `[.., in]`; output: `[.., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let h = ops::linear(self.dropout.forward(x), self.a.val(), None);
        ops::linear(h, self.b.val().mul_scalar(self.scale), None)
    }
}

/// The projection `target` of a layer.
/// The projection `target` names in a decoder layer, borrowed with `&` or `&mut`: one table
/// for both borrows.
macro_rules! projection {
    ($layer:expr, $target:expr, $($borrow:tt)+) => {
        match $target {
            Target::Q => $($borrow)+ $layer.self_attn.q_proj,
            Target::K => $($borrow)+ $layer.self_attn.k_proj,
            Target::V => $($borrow)+ $layer.self_attn.v_proj,
            Target::O => $($borrow)+ $layer.self_attn.o_proj,
            Target::Gate => $($borrow)+ $layer.mlp.gate_proj,
            Target::Up => $($borrow)+ $layer.mlp.up_proj,
            Target::Down => $($borrow)+ $layer.mlp.down_proj,
        }
    };
}

fn proj_mut(layer: &mut DecoderLayer, target: Target) -> &mut Proj {
    projection!(layer, target, &mut)
}

fn proj(layer: &DecoderLayer, target: Target) -> &Proj {
    projection!(layer, target, &)
}

fn to_tensor(t: &F32Tensor, device: &Device) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(t.data.clone(), [t.shape[0], t.shape[1]]),
        device,
    )
}

fn to_f32(t: &Tensor<2>) -> Result<F32Tensor> {
    let data = t
        .to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Internal(format!("LoRA factor: {e:?}")))?;
    Ok(F32Tensor {
        shape: t.dims().to_vec(),
        data,
    })
}

/// Where attached adapters start.
#[derive(Debug, Clone, Copy)]
pub enum Init<'a> {
    /// New: `A` uniform in `±1/sqrt(in)` (PEFT's Kaiming draw), drawn on the host from this
    /// seed and the module's name, so every backend starts from the same values; `B` zero.
    Fresh(u64),
    /// The factors of an adapter, which must hold every adapted module with the base's shapes.
    From(&'a Adapter),
}

/// Attaches adapters of shape `cfg` to the decoder, starting as `init` says. `ids` gives each
/// factor the parameter id it had when saved (keyed by PEFT name, see [`adapter_of`]).
pub fn attach(
    decoder: &mut Decoder,
    cfg: &LoraConfig,
    init: Init<'_>,
    ids: Option<&ParamIds>,
    origin: &str,
    device: &Device,
) -> Result<()> {
    let rank = cfg.rank;
    for (layer, target) in cfg.modules(decoder.layers.len()) {
        let module = target.module_name(layer);
        let p = proj_mut(&mut decoder.layers[layer], target);
        let [d_in, d_out] = p.base.weight.dims();
        let (a, b) = match init {
            Init::From(ad) => {
                let pair = ad.pairs.get(&module).ok_or_else(|| Error::Weights {
                    path: origin.to_string(),
                    msg: format!(
                        "the adapter has no factors for `{module}`, which its config adapts"
                    ),
                })?;
                if pair.a.shape != [rank, d_in] || pair.b.shape != [d_out, rank] {
                    return Err(Error::Weights {
                        path: origin.to_string(),
                        msg: format!(
                            "`{module}`: factors {:?} and {:?} do not fit a [{d_out}, {d_in}] weight at rank {rank}",
                            pair.a.shape, pair.b.shape
                        ),
                    });
                }
                (
                    to_tensor(&pair.a.transposed(), device),
                    to_tensor(&pair.b.transposed(), device),
                )
            }
            Init::Fresh(seed) => {
                let bound = 1.0 / (d_in as f64).sqrt();
                let a = F32Tensor {
                    shape: vec![d_in, rank],
                    data: crate::host_init::uniform(d_in * rank, bound, seed, &module),
                };
                (to_tensor(&a, device), Tensor::zeros([rank, d_out], device))
            }
        };
        let [key_a, key_b] = factor_keys(&module);
        let id = |key: &str| {
            ids.and_then(|m| m.get(key).copied())
                .map_or_else(ParamId::new, ParamId::from)
        };
        p.lora = Some(Lora {
            a: Param::initialized(id(&key_a), crate::device::trainable(a)),
            b: Param::initialized(id(&key_b), crate::device::trainable(b)),
            dropout: DropoutConfig::new(cfg.dropout).init(),
            scale: cfg.scale(),
        });
    }
    Ok(())
}

/// The attached adapters in PEFT's layout (factors by HF module name), with the parameter id
/// of each factor by PEFT key.
pub fn adapter_of(decoder: &Decoder) -> Result<(BTreeMap<String, LoraPair>, ParamIds)> {
    let mut pairs = BTreeMap::new();
    let mut ids = ParamIds::new();
    for (l, layer) in decoder.layers.iter().enumerate() {
        for target in Target::ALL {
            let Some(lora) = &proj(layer, target).lora else {
                continue;
            };
            let module = target.module_name(l);
            let [key_a, key_b] = factor_keys(&module);
            ids.insert(key_a, lora.a.id.val());
            ids.insert(key_b, lora.b.id.val());
            let pair = LoraPair {
                a: to_f32(&lora.a.val())?.transposed(),
                b: to_f32(&lora.b.val())?.transposed(),
            };
            pairs.insert(module, pair);
        }
    }
    Ok((pairs, ids))
}

/// Which parameters of a model train.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trainable {
    /// Only the LoRA factors (with the base frozen).
    pub lora: bool,
    /// Only the top this many decoder layers and the final norm (without `lora`).
    pub top_layers: Option<usize>,
    /// Module paths trained whole besides (a reward head: `score`).
    pub heads: Vec<String>,
}

impl Trainable {
    /// Everything trains (full fine-tuning).
    pub fn is_everything(&self) -> bool {
        !self.lora && self.top_layers.is_none()
    }

    /// The layers that take part in training in a model of `num_layers`: all but the frozen
    /// bottom ones.
    pub fn first_trained_layer(&self, num_layers: usize) -> usize {
        self.top_layers.map_or(0, |n| num_layers.saturating_sub(n))
    }

    /// Freezes (no gradient, so no gradient buffer and no optimiser state) every parameter of
    /// `model` outside this set; a model of `num_layers` decoder layers.
    pub fn apply<M: Module>(&self, model: M, num_layers: usize) -> Result<M> {
        if self.is_everything() {
            return Ok(model);
        }
        let mut patterns: Vec<String> = self
            .heads
            .iter()
            .map(|h| format!(r"^{}\.", regex_escape(h)))
            .collect();
        if self.lora {
            patterns.push(r"\.lora\.(a|b)$".into());
        } else {
            let first = self.first_trained_layer(num_layers);
            let layers: Vec<String> = (first..num_layers).map(|l| l.to_string()).collect();
            patterns.push(format!(r"^model\.layers\.({})\.", layers.join("|")));
            patterns.push(r"^model\.norm\.".into());
        }
        let group = ParamGroup::from_any_regexes(patterns)
            .map_err(|e| Error::Internal(format!("trainable parameters: {e:?}")))?;
        Ok(model.no_grad().set_require_grad_group(group, true))
    }
}

fn regex_escape(s: &str) -> String {
    s.replace('.', r"\.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::GradientsParams;
    use burn::tensor::Distribution;
    use gram_core::ModelConfig;

    use crate::CausalLm;

    fn tiny() -> ModelConfig {
        crate::testing::tiny_config(false)
    }

    fn values(t: Tensor<2>) -> F32Tensor {
        to_f32(&t).expect("f32 values")
    }

    /// An adapter on layer 1's q and down projections with random (non-zero) factors.
    fn adapter(cfg: &LoraConfig, model: &CausalLm, device: &Device) -> Adapter {
        let mut pairs = BTreeMap::new();
        for (layer, target) in cfg.modules(2) {
            let [d_in, d_out] = proj(&model.model.layers[layer], target).base.weight.dims();
            let r = cfg.rank;
            let rand = |shape: [usize; 2]| {
                values(Tensor::random(
                    shape,
                    Distribution::Normal(0.0, 0.3),
                    device,
                ))
            };
            pairs.insert(
                target.module_name(layer),
                LoraPair {
                    a: rand([r, d_in]),
                    b: rand([d_out, r]),
                },
            );
        }
        Adapter {
            lora: cfg.clone(),
            task: gram_core::adapter::Task::CausalLm,
            base_model: None,
            pairs,
            saved: BTreeMap::new(),
        }
    }

    /// A fixed random linear functional of every logit of a left-padded batch.
    struct Probe {
        ids: Tensor<2, Int>,
        mask: Tensor<2, Int>,
        weights: Tensor<3>,
    }

    impl Probe {
        fn new(device: &Device) -> Self {
            let ids = Tensor::from_data(
                TensorData::new(vec![0i64, 5, 9, 11, 3, 7, 21, 2, 30, 8], [2, 5]),
                device,
            );
            let mask = Tensor::from_data(
                TensorData::new(vec![0i64, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 5]),
                device,
            );
            let weights = Tensor::random([2, 5, 40], Distribution::Normal(0.0, 1.0), device);
            Self { ids, mask, weights }
        }

        fn loss(&self, m: &CausalLm) -> Tensor<1> {
            (m.forward(self.ids.clone(), self.mask.clone()) * self.weights.clone()).sum()
        }

        fn value(&self, m: &CausalLm) -> f64 {
            f64::from(self.loss(m).into_scalar::<f32>())
        }
    }

    /// The index of the largest magnitude.
    fn largest(v: &[f32]) -> usize {
        (0..v.len()).fold(
            0,
            |best, i| if v[i].abs() > v[best].abs() { i } else { best },
        )
    }

    /// `|numeric - analytic|` within 2% of the larger (plus a floor for f32 rounding).
    fn close(numeric: f64, analytic: f64) -> bool {
        (numeric - analytic).abs() <= 0.02 * numeric.abs().max(analytic.abs()) + 2e-3
    }

    #[test]
    fn lora_gradients_match_finite_differences_and_the_base_gets_none() -> Result<()> {
        let device = Device::flex().autodiff();
        device.seed(3);
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec![Target::Q, Target::Down],
            rslora: false,
            layers: Some(vec![1]),
        };
        let base = CausalLm::init(&tiny(), &device);
        let ad = adapter(&cfg, &base, &device);
        let probe = Probe::new(&device);
        let with = |ad: &Adapter| -> Result<CausalLm> {
            let mut m = base.clone();
            attach(&mut m.model, &cfg, Init::From(ad), None, "test", &device)?;
            Trainable {
                lora: true,
                ..Trainable::default()
            }
            .apply(m, 2)
        };
        let model = with(&ad)?;
        let grads = GradientsParams::from_grads(probe.loss(&model).backward(), &model);
        let layer = &model.model.layers[1];
        assert!(
            grads
                .get::<2>(layer.self_attn.q_proj.base.weight.id)
                .is_none(),
            "a frozen weight got a gradient"
        );
        assert!(grads.get::<2>(model.model.embed_tokens.weight.id).is_none());
        let eps = 1e-2;
        // The model is drawn from the device's generator, which other tests share: check each
        // factor at its largest gradient, whatever the draw.
        for (target, factor) in [
            (Target::Q, 'a'),
            (Target::Q, 'b'),
            (Target::Down, 'a'),
            (Target::Down, 'b'),
        ] {
            let lora = proj(layer, target).lora.as_ref().expect("attached");
            // PEFT layout [row, col] is burn's [col, row].
            let param = if factor == 'a' { &lora.a } else { &lora.b };
            let rows = param.dims()[1];
            let g = values(grads.get::<2>(param.id).expect("a LoRA factor's gradient"));
            let k = largest(&g.data);
            let (col, row) = (k / rows, k % rows);
            let analytic = f64::from(g.data[k]);
            let shifted = |d: f32| -> Result<f64> {
                let mut ad = ad.clone();
                let pair = ad.pairs.get_mut(&target.module_name(1)).expect("pair");
                let t = if factor == 'a' {
                    &mut pair.a
                } else {
                    &mut pair.b
                };
                let cols = t.shape[1];
                t.data[row * cols + col] += d;
                Ok(probe.value(&with(&ad)?))
            };
            let numeric = (shifted(eps)? - shifted(-eps)?) / (2.0 * f64::from(eps));
            assert!(
                close(numeric, analytic),
                "{target:?}.{factor}[{row},{col}]: finite difference {numeric}, gradient {analytic}"
            );
            assert!(
                analytic.abs() > 1e-3,
                "a gradient this small tests nothing: {analytic}"
            );
        }
        Ok(())
    }

    #[test]
    fn top_layer_gradients_match_finite_differences_and_lower_layers_are_not_recorded() -> Result<()>
    {
        let device = Device::flex().autodiff();
        device.seed(4);
        let base = CausalLm::init(&tiny(), &device);
        let probe = Probe::new(&device);
        let top = Trainable {
            top_layers: Some(1),
            ..Trainable::default()
        };
        let model = top.apply(base.clone(), 2)?;
        let grads = GradientsParams::from_grads(probe.loss(&model).backward(), &model);
        let below = &model.model.layers[0];
        assert!(
            grads.get::<2>(below.mlp.up_proj.base.weight.id).is_none(),
            "a frozen layer got a gradient"
        );
        assert!(grads.get::<1>(below.input_layernorm.gamma.id).is_none());
        assert!(grads.get::<2>(model.model.embed_tokens.weight.id).is_none());
        assert!(
            grads.get::<1>(model.model.norm.gamma.id).is_some(),
            "the final norm trains"
        );
        let w = &model.model.layers[1].self_attn.v_proj.base.weight;
        let g = values(grads.get::<2>(w.id).expect("the top layer's gradient"));
        let cols = g.shape[1];
        let eps = 1e-2;
        for k in [largest(&g.data), largest(&g.data[..g.data.len() / 2])] {
            let (r, c) = (k / cols, k % cols);
            let analytic = f64::from(g.data[k]);
            let shifted = |d: f32| {
                let mut m = base.clone();
                let p = &mut m.model.layers[1].self_attn.v_proj.base.weight;
                let mut v = values(p.val());
                v.data[r * cols + c] += d;
                *p = Param::initialized(p.id, to_tensor(&v, &device));
                probe.value(&m)
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * f64::from(eps));
            assert!(
                close(numeric, analytic),
                "v_proj[{r},{c}]: finite difference {numeric}, gradient {analytic}"
            );
            assert!(
                analytic.abs() > 1e-3,
                "a gradient this small tests nothing: {analytic}"
            );
        }
        Ok(())
    }

    #[test]
    fn saved_factors_are_the_attached_ones() -> Result<()> {
        let device = Device::flex();
        device.seed(5);
        let cfg = LoraConfig {
            rank: 3,
            alpha: 3.0,
            dropout: 0.1,
            targets: Target::ALL.to_vec(),
            rslora: false,
            layers: None,
        };
        let mut model = CausalLm::init(&tiny(), &device);
        let ad = adapter(&cfg, &model, &device);
        attach(
            &mut model.model,
            &cfg,
            Init::From(&ad),
            None,
            "test",
            &device,
        )?;
        let (pairs, ids) = adapter_of(&model.model)?;
        assert_eq!(pairs, ad.pairs);
        assert_eq!(ids.len(), 2 * 7 * 2);
        Ok(())
    }
}
