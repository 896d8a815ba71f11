//! gram-data: DataFusion pipelines from raw preference files to GRAM's stage-1 and stage-2
//! datasets (tokenised, split, Parquet), with rejects and stats. No burn.

pub mod build;
pub mod map;
pub mod read;
pub mod spec;
