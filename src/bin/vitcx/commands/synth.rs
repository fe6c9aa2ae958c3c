//! `vitcx synth`: writes the seeded shape benchmark (images, masks, `manifest.jsonl`) to a directory.

use std::process::ExitCode;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::SynthArgs;

pub fn run(a: SynthArgs) -> Result<ExitCode> {
    let bar = if a.quiet {
        ProgressBar::with_draw_target(Some(a.count as u64), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(a.count as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} samples  {elapsed_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix("synth");
    let scene = vitcx::eval::synth::Scene {
        diameter: a.object_size,
        clutter: a.clutter,
    };
    let result = vitcx::eval::synth::write_dataset(&a.out, a.count, a.seed, &scene, &mut |n| {
        bar.set_position(n as u64)
    });
    bar.finish_and_clear();
    result.with_context(|| format!("cannot write the benchmark to {}", a.out.display()))?;
    if !a.quiet {
        eprintln!(
            "wrote {} samples (seed {}) and manifest.jsonl to {}",
            a.count,
            a.seed,
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
