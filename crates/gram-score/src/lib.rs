//! gram-score: GRAM judges exported by `gram-export onnx`, run through onnxruntime (`ort`):
//! batch jobs over Parquet (pairwise, against a reference, best-of-n), accuracy on labeled
//! pairs, and an HTTP reward server with dynamic batching.

mod cluster;
pub mod error;
pub mod eval;
pub mod input;
pub mod jobs;
pub mod judge;
pub mod out;
pub mod runtime;
pub mod serve;
pub mod udf;

pub use error::{Error, Result};
pub use judge::{BatchLimits, Judge, PairScore, RunStats, Scorer};
pub use runtime::Threads;
