//! Backend selection: the CPU (burn's flex backend) or any GPU wgpu reaches.

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
        Backend::Cpu => Ok(Device::flex()),
        Backend::Wgpu => WGPU
            .get_or_init(|| Device::wgpu_options().init().map_err(|e| e.to_string()))
            .clone()
            .map_err(|e| crate::Error::Device(format!("no usable wgpu device ({e}); install a Vulkan driver (e.g. Mesa's mesa-vulkan-drivers) or use --backend cpu"))),
    }
}
