//! GRAM-rs end-to-end tests, one module per area (one test binary, so burn links once).

mod cli;
mod cluster;
mod common;
mod data;
mod deps;
mod export;
mod fuzz;
mod lora;
mod model;
mod score;
mod serve;
mod store;
mod train;
