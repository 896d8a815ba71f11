//! Backend selection: the CPU (burn's flex backend) or any GPU wgpu reaches.

use burn::backend::DispatchDevice;
use burn::prelude::*;

/// Where tensors live.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's pure-Rust CPU backend (flex).
    Cpu,
    /// wgpu: Vulkan, Metal, DX12 (and Mesa's lavapipe on a CPU).
    Wgpu,
}

/// Opens the device of a backend; wgpu fails with a clear message when no adapter is found.
/// The wgpu runtime can be initialised once per process, so the first result is kept and
/// every later call (another model, another test thread) gets the same device or error.
pub fn device(backend: Backend) -> crate::Result<Device> {
    static WGPU: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    match backend {
        Backend::Cpu => {
            flush_subnormals();
            Ok(Device::flex())
        }
        Backend::Wgpu => WGPU
            .get_or_init(|| Device::wgpu_options().init().map_err(|e| e.to_string()))
            .clone()
            .map_err(|e| crate::Error::Device(format!("no usable wgpu device ({e}); install a Vulkan driver (e.g. Mesa's mesa-vulkan-drivers) or use --backend cpu"))),
    }
}

/// Whether `device` is burn's CPU backend (flex, with or without autodiff): where the fused CPU
/// kernels and the in-place optimiser step run.
pub fn is_cpu(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Sets flush-to-zero and denormals-are-zero on the calling thread and on every thread of
/// rayon's global pool (where burn's CPU backend and the fused kernels run their work).
///
/// Why: a randomly initialised or freshly fine-tuned model has gradients far from the loss that
/// fall below f32's normal range (~1.2e-38); x86 cores take a microcode assist for every such
/// operand, and a matrix product fed with them was measured here ~50x slower (gemm crate, 2048 x
/// 512 x 1376: 240 -> 5.7 GFLOP/s). Flushing them changes values smaller than 1e-38 only.
/// PyTorch offers the same switch (`torch.set_flush_denormal`).
pub fn flush_subnormals() {
    fn set() {
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code, deprecated)]
        // SAFETY: reading and writing this thread's MXCSR register only changes how this thread
        // rounds subnormal floats (bits 15 FTZ and 6 DAZ); it touches no memory.
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | 0x8040);
        }
    }
    set();
    rayon::broadcast(|_| set());
}

/// `t` as a trainable leaf: requiring gradients on an autodiff device, as it is elsewhere
/// (where requiring them is an error).
pub fn trainable<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.device().is_autodiff() {
        t.set_require_grad(true)
    } else {
        t
    }
}
