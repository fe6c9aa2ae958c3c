//! Evaluation.

pub mod metrics;
pub mod synth;
