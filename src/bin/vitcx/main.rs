//! The `vitcx` command: a thin layer over the library (arguments -> checked values -> library
//! calls -> files and text). Each subcommand is one file of `commands/`; they share only the
//! argument definitions, the model loading of `common`, the input listing and the progress
//! bars. Errors print once as `vitcx: <cause chain>` and exit with code 2.

mod args;
mod commands;
mod common;
mod inputs;
mod progress;
mod runs;

use std::process::ExitCode;

use anyhow::Result;
use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};

use args::{Cli, Command};

/// candle allocates a fresh buffer per tensor op; mimalloc reuses freed memory instead of
/// returning it to the kernel and faulting zeroed pages back in each op.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Some((_, sub)) = matches.subcommand() {
        for line in args::unread_flags(&cli.command, sub) {
            eprintln!("vitcx: {line}");
        }
    }
    on_signal_clean_up();
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
        Command::Merge(a) => commands::merge::run(a),
        Command::Bench(a) => commands::bench::run(a, &device),
    }
}

/// On SIGINT or SIGTERM: remove the files of the image being written (every set committed
/// before stays complete), say so in one line, and exit with 128 + the signal (130, 143) at once.
#[cfg(unix)]
fn on_signal_clean_up() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            vitcx::io::output::discard_staged();
            eprintln!(
                "vitcx: interrupted; files of the image in progress removed, earlier ones complete"
            );
            std::process::exit(128 + sig);
        }
    });
}

#[cfg(not(unix))]
fn on_signal_clean_up() {}

/// A command-line error as one `vitcx:` line and exit code 2; `--help`, `--version` and a bare
/// `vitcx` print clap's own text as they are.
fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    eprintln!("vitcx: {}", clap_line(&e.render().to_string()));
    ExitCode::from(2)
}

/// clap's message (`error: ...`, a `tip:`, the usage) folded into one line: the error, its tip,
/// and where to look.
fn clap_line(text: &str) -> String {
    // clap writes paragraphs: the error (maybe over several lines), a tip, the usage, a pointer.
    let paragraphs: Vec<String> = text
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect();
    let first = paragraphs
        .first()
        .map(|p| p.trim_start_matches("error: ").to_string())
        .unwrap_or_else(|| "invalid arguments".into());
    let mut out = first;
    for p in &paragraphs[1..] {
        if let Some(tip) = p.strip_prefix("tip: ") {
            out.push_str(&format!(" ({tip})"));
        }
    }
    out.push_str("; see --help");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn clap_errors_fold_into_one_line() {
        let text = "error: unexpected argument '-1' found\n\n  tip: to pass '-1' as a value, use '-- -1'\n\nUsage: vitcx explain [OPTIONS] <IMAGES>...\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_line(text),
            "unexpected argument '-1' found (to pass '-1' as a value, use '-- -1'); see --help"
        );
        let e =
            Cli::try_parse_from(["vitcx", "explain", "x.png", "--precision", "f64"]).unwrap_err();
        let line = clap_line(&e.render().to_string());
        assert!(!line.contains('\n') && line.contains("f64"), "{line}");
        let e = Cli::try_parse_from(["vitcx", "explain"]).unwrap_err();
        let line = clap_line(&e.render().to_string());
        assert!(line.contains("not provided: <IMAGES>"), "{line}");
    }
}
