//! The `vitcx` command: a thin layer over the library (arguments -> checked values -> library
//! calls -> files and text). Each subcommand is one file of `commands/`; they share only the
//! argument definitions, the model loading of `common`, the input listing and the progress
//! bars. Errors print once as `vitcx: <cause chain>` and exit with code 2.

mod args;
mod commands;
mod common;
mod inputs;
mod progress;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use args::{Cli, Command};

/// candle allocates a fresh buffer per tensor op; mimalloc reuses freed memory instead of
/// returning it to the kernel and faulting zeroed pages back in each op.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if common::is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("vitcx: {}", common::one_line(&err));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let device = vitcx::model::device(&cli.device)?;
    match cli.command {
        Command::Explain(a) => commands::explain::run(a, &device),
        Command::Predict(a) => commands::predict::run(a, &device),
        Command::Inspect(a) => commands::inspect::run(a, &device),
        Command::Synth(a) => commands::synth::run(a),
        Command::Eval(a) => commands::eval::run(a, &device),
        Command::Compare(a) => commands::compare::run(a, &device),
        Command::Bench(a) => commands::bench::run(a, &device),
    }
}
