//! Runs over many images: which images a task of a job array takes ([`shard`]), the record that
//! lets a run resume where it stopped and shards be combined ([`record`]), and the exact merge
//! of shards' evaluations ([`merge`]).

pub mod merge;
pub mod record;
pub mod shard;

pub use record::{Header, Line, Record, Status, Writer};
pub use shard::Shard;
