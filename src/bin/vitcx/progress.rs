//! Progress bars: one for the images, one for the stages of the current image.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vitcx::methods::{Progress, Stage};

/// Two bars on stderr (hidden when stderr is not a terminal or with `--quiet`).
pub struct Bars {
    pub images: ProgressBar,
    stage: ProgressBar,
}

impl Bars {
    /// Bars for `total` images.
    pub fn new(total: u64, quiet: bool) -> Self {
        let multi = if quiet {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::new()
        };
        let images = multi.add(ProgressBar::new(total));
        images.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} images  {elapsed_precise}  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        images.set_prefix("explain");
        let stage = multi.add(ProgressBar::new(1));
        stage.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        stage.set_prefix("stage");
        Self { images, stage }
    }

    /// Prints a line above the bars (or plainly when hidden).
    pub fn println(&self, line: &str) {
        if self.images.is_hidden() {
            eprintln!("{line}");
        } else {
            self.images.println(line);
        }
    }

    /// Reports a failed image on one line: library errors about an image already name it,
    /// others get the path in front.
    pub fn report_failure(&self, path: &std::path::Path, err: &anyhow::Error) {
        let msg = crate::common::one_line(err);
        let shown = path.display().to_string();
        if msg.contains(&shown) {
            self.println(&format!("vitcx: {msg}"));
        } else {
            self.println(&format!("vitcx: {shown}: {msg}"));
        }
    }

    /// Clears both bars.
    pub fn finish(&self) {
        self.stage.finish_and_clear();
        self.images.finish_and_clear();
    }
}

impl Progress for Bars {
    fn start(&mut self, stage: Stage, total: u64) {
        self.stage.reset();
        self.stage.set_length(total);
        self.stage.set_position(0);
        let what = match stage {
            Stage::PERTURBED_FORWARD => "forward passes of perturbed images",
            s => s.name(),
        };
        self.stage.set_message(what.to_string());
    }

    fn advance(&mut self, n: u64) {
        self.stage.inc(n);
    }
}
