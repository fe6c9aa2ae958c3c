//! End-to-end tests of the `vitcx` binary, in one test binary: each runs the command and checks
//! the files it writes, its exit code and its one-line errors.

#[path = "../common/mod.rs"]
mod common;

mod bench;
mod commands;
mod compare;
mod eval;
mod hostile;
mod sanity;
mod shards;
mod synth;
