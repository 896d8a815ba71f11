//! Benchmarks; run by hand (see benches/README.md).
