//! AdamW as gram-train runs it: burn's `AdamW` arithmetic and state type, so `optimizer.bpk`
//! stays burn's record of `AdamWState`, with the update on the CPU done in place in one parallel
//! pass ([`adamw_step`]) instead of burn's eight single-threaded tensor passes. Other devices
//! (wgpu) run burn's `AdamW` itself.

use burn::backend::flex::FlexTensor;
use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk of the update (fixed, so the work split does not depend on the
/// thread count).
const ELEMS_PER_CHUNK: usize = 1 << 14;

/// AdamW without AMSGrad or cautious decay (what gram-train configures).
#[derive(Clone)]
pub struct FusedAdamW {
    burn: AdamW,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

/// The optimiser of a run: AdamW with these betas, epsilon and decoupled weight decay.
pub fn adamw(betas: (f32, f32), epsilon: f32, weight_decay: f32) -> ModuleOptimizer {
    let burn = AdamWConfig::new()
        .with_beta_1(betas.0)
        .with_beta_2(betas.1)
        .with_epsilon(epsilon)
        .with_weight_decay(weight_decay)
        .build();
    ModuleOptimizer::from(FusedAdamW {
        burn,
        beta_1: betas.0,
        beta_2: betas.1,
        epsilon,
        weight_decay,
    })
}

impl FusedAdamW {
    /// The constants of step `time` (from 1), computed as burn's `AdamW` computes them.
    fn constants(&self, lr: LearningRate, time: usize) -> AdamWStep {
        let t = time as i32;
        let decay_rate = lr * self.weight_decay as f64;
        AdamWStep {
            lr: lr as f32,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            decay: if decay_rate == 0.0 {
                1.0
            } else {
                (1.0 - decay_rate) as f32
            },
            bias_1: 1f32 - self.beta_1.powi(t),
            bias_2: 1f32 - self.beta_2.powi(t),
        }
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if !gram_model::device::is_cpu(&tensor.device()) {
            return self.burn.step(lr, tensor, grad, state);
        }
        // A first step is the general one from zero moments: 0 * beta + x is x exactly.
        let (moment_1, moment_2, time) = match state {
            Some(s) => (
                s.momentum.moment_1,
                s.momentum.moment_2,
                s.momentum.time + 1,
            ),
            None => (grad.zeros_like(), grad.zeros_like(), 1),
        };
        let c = self.constants(lr, time);
        let (tensor, moment_1, moment_2) = adamw_in_place(tensor, grad, moment_1, moment_2, &c);
        let momentum = AdaptiveMomentumState {
            time,
            moment_1,
            moment_2,
            max_moment_2: None,
        };
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <AdamW as Optimizer>::to_device(state, device)
    }
}

/// AdamW's hyper-parameters for one step, in the form burn's `AdamW` computes with.
#[derive(Clone, Copy, Debug)]
struct AdamWStep {
    /// Learning rate (burn multiplies the update by it as an f32).
    lr: f32,
    /// First-moment decay.
    beta_1: f32,
    /// Second-moment decay.
    beta_2: f32,
    /// Added to the root of the corrected second moment.
    epsilon: f32,
    /// `1 - lr * weight_decay` (1 when there is no decay).
    decay: f32,
    /// `1 - beta_1^t` and `1 - beta_2^t` for this step's `t` (from 1).
    bias_1: f32,
    /// See `bias_1`.
    bias_2: f32,
}

/// One AdamW step in place over a parameter, its gradient and its two moments: the same
/// arithmetic, operation by operation, as burn's `AdamW` (which runs it as eight tensor passes,
/// each allocating its output, on one thread), in one parallel pass.
fn adamw_step(p: &mut [f32], g: &[f32], m1: &mut [f32], m2: &mut [f32], c: &AdamWStep) {
    let n = p.len();
    assert!(
        g.len() == n && m1.len() == n && m2.len() == n,
        "adamw: parameter, gradient and moments differ in length"
    );
    let f1 = 1.0 - c.beta_1;
    let f2 = 1.0 - c.beta_2;
    p.par_chunks_mut(ELEMS_PER_CHUNK)
        .zip(g.par_chunks(ELEMS_PER_CHUNK))
        .zip(m1.par_chunks_mut(ELEMS_PER_CHUNK))
        .zip(m2.par_chunks_mut(ELEMS_PER_CHUNK))
        .for_each(|(((p, g), m1), m2)| {
            for i in 0..p.len() {
                let gi = g[i];
                let a = m1[i] * c.beta_1 + gi * f1;
                let b = m2[i] * c.beta_2 + (gi * gi) * f2;
                m1[i] = a;
                m2[i] = b;
                let delta = (a / c.bias_1) / ((b / c.bias_2).sqrt() + c.epsilon);
                let kept = if c.decay == 1.0 { p[i] } else { p[i] * c.decay };
                p[i] = kept - delta * c.lr;
            }
        });
}

/// The flex tensor inside a CPU float tensor, with its autodiff context to put it back.
fn into_flex<const D: usize>(t: Tensor<D>) -> (FlexTensor, DispatchAutodiffContext) {
    let DispatchTensor { kind, autodiff } = t.into_dispatch();
    match kind {
        DispatchTensorKind::Flex(BackendTensor::Float(f)) => (f, autodiff),
        _ => panic!("the in-place AdamW step runs on CPU float tensors only"),
    }
}

fn from_flex<const D: usize>(f: FlexTensor, autodiff: DispatchAutodiffContext) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Flex(BackendTensor::Float(f)),
        autodiff,
    })
}

/// A tensor whose storage can be written in place as its elements in order: contiguous from
/// offset 0 (a copy otherwise; shared storage is copied on write by `storage_mut`).
fn dense(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

/// One AdamW step ([`adamw_step`]) in place on CPU tensors of the same shape: the
/// parameter, its gradient and the two moments; returns the parameter and the moments.
///
/// # Panics
/// If a tensor is not a CPU float tensor (callers check [`gram_model::device::is_cpu`] first).
fn adamw_in_place<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
    c: &AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, p_ctx) = into_flex(param);
    let (g, _) = into_flex(grad);
    let (m1, m1_ctx) = into_flex(moment_1);
    let (m2, m2_ctx) = into_flex(moment_2);
    let (mut p, g, mut m1, mut m2) = (dense(p), g.to_contiguous(), dense(m1), dense(m2));
    let n = p.layout().num_elements();
    adamw_step(
        &mut p.storage_mut::<f32>()[..n],
        g.as_slice::<f32>().expect("a contiguous f32 gradient"),
        &mut m1.storage_mut::<f32>()[..n],
        &mut m2.storage_mut::<f32>()[..n],
        c,
    );
    (
        from_flex(p, p_ctx),
        from_flex(m1, m1_ctx),
        from_flex(m2, m2_ctx),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::Distribution;

    fn values(l: &Linear) -> Vec<f32> {
        let mut v = l.weight.val().into_data().try_to_vec::<f32>().expect("f32");
        let b = l.bias.as_ref().expect("bias").val();
        v.extend(b.into_data().try_to_vec::<f32>().expect("f32"));
        v
    }

    fn step(optim: &mut ModuleOptimizer, l: Linear, x: &Tensor<2>) -> Linear {
        let loss = l.forward(x.clone()).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &l);
        optim.step(1e-2, l, grads)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Uniform values in [-1, 1) from a fixed linear congruential sequence.
    fn uniform(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn diff64(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - y).abs())
            .fold(0.0, f64::max)
    }

    /// The in-place update against an f64 AdamW, over two parallel chunks.
    #[test]
    fn adamw_step_is_adamw() {
        let mut seed = 13;
        let n = ELEMS_PER_CHUNK + 37; // two chunks
        let p0 = uniform(n, &mut seed);
        let (mut p, mut m1, mut m2) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut rp, mut r1, mut r2): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            p0.iter().map(|&x| f64::from(x)).collect(),
            vec![0.0; n],
            vec![0.0; n],
        );
        let (lr, b1, b2, eps, wd) = (1e-2f64, 0.9f64, 0.999f64, 1e-8f64, 0.1f64);
        for t in 1..=3 {
            let g = uniform(n, &mut seed);
            let c = AdamWStep {
                lr: lr as f32,
                beta_1: b1 as f32,
                beta_2: b2 as f32,
                epsilon: eps as f32,
                decay: (1.0 - lr * wd) as f32,
                bias_1: 1.0 - (b1 as f32).powi(t),
                bias_2: 1.0 - (b2 as f32).powi(t),
            };
            adamw_step(&mut p, &g, &mut m1, &mut m2, &c);
            for i in 0..n {
                let gi = f64::from(g[i]);
                r1[i] = b1 * r1[i] + (1.0 - b1) * gi;
                r2[i] = b2 * r2[i] + (1.0 - b2) * gi * gi;
                let upd =
                    (r1[i] / (1.0 - b1.powi(t))) / ((r2[i] / (1.0 - b2.powi(t))).sqrt() + eps);
                rp[i] = rp[i] * (1.0 - lr * wd) - lr * upd;
            }
        }
        assert!(diff64(&m1, &r1) < 1e-6);
        assert!(diff64(&m2, &r2) < 1e-6);
        // The parameters moved (AdamW's steps are about lr each), and by what AdamW says.
        assert!(diff64(&p0, &rp) > 5e-3);
        assert!(diff64(&p, &rp) < 1e-5);
    }

    #[test]
    fn cpu_adamw_follows_burns_adamw_and_keeps_its_state_format() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let start: Linear = LinearConfig::new(300, 70).init(&device);
        let burn_config = AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.1);
        let mut ours = adamw((0.9, 0.999), 1e-8, 0.1);
        let mut theirs = burn_config.init();
        let (mut a, mut b) = (start.clone(), start.clone());
        let xs: Vec<Tensor<2>> = (0..4)
            .map(|_| Tensor::random([8, 300], Distribution::Normal(0.0, 1.0), &device))
            .collect();
        for x in &xs[..3] {
            a = step(&mut ours, a, x);
            b = step(&mut theirs, b, x);
        }
        let moved = max_diff(&values(&a), &values(&start));
        assert!(moved > 1e-2, "the parameters did not move ({moved})");
        let d = max_diff(&values(&a), &values(&b));
        assert!(d <= 1e-6, "fused AdamW vs burn's AdamW after 3 steps: {d}");
        // Our saved state is burn's AdamW record: burn's optimiser resumes from it.
        let dir = std::env::temp_dir().join(format!("gram-optim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("optimizer.bpk");
        ours.save(&path).expect("save");
        let mut resumed = burn_config
            .init()
            .load(&path)
            .expect("burn loads our state");
        let c = step(&mut resumed, a.clone(), &xs[3]);
        let a = step(&mut ours, a, &xs[3]);
        std::fs::remove_dir_all(&dir).ok();
        let d = max_diff(&values(&a), &values(&c));
        assert!(d <= 1e-6, "burn resumed from our state differs by {d}");
    }
}
