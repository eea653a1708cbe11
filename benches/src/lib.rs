//! Criterion benchmarks live in `benches/`; `cargo bench -p graft-benches` runs them.
