//! Evaluation: how faithful an explanation is. [`metrics`] (deletion and insertion curves,
//! pointing games, summaries), [`dataset`] (the images and their ground truth), [`harness`] (one
//! image through one method and the metrics), [`report`] (the files of a run), [`sanity`] (the
//! model-randomisation check of Adebayo et al.) and [`synth`]
//! (the seeded shapes benchmark with object masks).

pub mod dataset;
pub mod harness;
pub mod metrics;
pub mod report;
pub mod sanity;
pub mod synth;
