//! gram-data: DataFusion pipelines from raw preference files to GRAM's stage-1 and stage-2
//! datasets (tokenised, split, Parquet), with rejects and stats. No burn.

pub mod build;
pub mod cluster;
mod dedup;
mod dest;
pub mod error;
pub mod map;
mod pairs;
mod plan;
pub mod read;
mod scan;
mod shards;
mod sink;
pub mod spec;
mod stage;
pub mod stats;
pub mod udf;

pub use error::{Error, Result};
