//! gram-model: the burn model of GRAM-rs. LLaMA / Qwen2 / Qwen3 decoders (config -> modules ->
//! forward), weights from what gram-core reads, the GRAM and Bradley-Terry losses, devices.

pub mod device;
pub mod error;
mod fused;
pub mod host_init;
mod kernels;
pub mod load;
pub mod lora;
pub mod loss;
pub mod model;
pub mod ops;
pub mod recompute;
pub mod reward;
pub mod rope;
#[cfg(test)]
mod testing;

pub use device::{Backend, device};
pub use error::{Error, Result};
pub use load::{ParamIds, from_weights, from_weights_with_ids, hf_tensors, load};
pub use model::CausalLm;
pub use reward::RewardModel;
