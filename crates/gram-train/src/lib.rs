//! gram-train: GRAM's two stages (pair pre-training, label-smoothed A/B fine-tuning) and a
//! Bradley-Terry baseline, trained with burn on the CPU or on any GPU wgpu reaches, from an HF
//! checkpoint, a GGUF, or an earlier run; checkpoints in the HF layout, exact resumption.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod init;
pub mod objective;
pub mod optim;
pub mod plot;
pub mod settings;
pub mod train;
pub mod tuning;

pub use error::{Error, Result};
pub use settings::{Settings, Stage};
pub use train::{RunOptions, Summary, run};
