//! Criterion benchmarks for slm live in `benches/`.
