//! The library's integration tests, in one test binary (one link instead of one per file):
//! faithfulness to the reference code and to PyTorch, the loaders, the metrics, the seam, and
//! the layout's rules.

#[path = "../common/mod.rs"]
mod common;

mod architecture;
mod beit_eva;
mod checkpoints;
mod families;
mod fuzz_corpus;
mod golden;
mod methods;
mod metrics;
mod pickle;
mod swin;
mod zoo;
