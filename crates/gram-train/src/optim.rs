//! AdamW as gram-train runs it: burn's `AdamW` arithmetic and state type, so `optimizer.bpk`
//! stays burn's record of `AdamWState`, with the update on the CPU done in place in one parallel
//! pass ([`gram_model::kernels::adamw_step`]) instead of burn's eight single-threaded tensor
//! passes. Other devices (wgpu) run burn's `AdamW` itself.

use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};
use gram_model::fused;
use gram_model::kernels::AdamWStep;

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
        if !fused::cpu_fused(&tensor.device()) {
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
        let (tensor, moment_1, moment_2) = fused::adamw(tensor, grad, moment_1, moment_2, &c);
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
