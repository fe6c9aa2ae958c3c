//! The shared driver of every explanation method, as pytorch-grad-cam's `BaseCAM` is for its
//! CAMs: it checks the input, runs the clean pass the method asks for, resolves the targets,
//! times each stage, reports progress, runs batches of perturbed images and assembles the
//! [`Explanation`]. A method supplies only its own step ([`Method::maps`]).

use std::time::Instant;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{Attention, Backbone, Precision, TapGradient};
use crate::target::{argmax, Score, Targets};

/// A stage of an explanation, named for progress bars and timings. Methods add their own
/// (ViT-CX's similarity and clustering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stage(pub &'static str);

impl Stage {
    /// The clean forward pass (prediction, and tokens, attention or gradients).
    pub const FORWARD: Stage = Stage("forward");
    /// Making masks.
    pub const MASKS: Stage = Stage("masks");
    /// Forward passes of perturbed images.
    pub const PERTURBED_FORWARD: Stage = Stage("perturbed_forward");
    /// From the method's numbers to the saliency maps.
    pub const AGGREGATION: Stage = Stage("aggregation");

    /// Short stable name (used in JSON timings and progress bars).
    pub fn name(self) -> &'static str {
        self.0
    }
}

/// Receives progress: `start(stage, total_units)` then `advance(n)` as units complete.
pub trait Progress {
    /// A stage begins; `total` units of work (images for forward passes, 1 otherwise).
    fn start(&mut self, stage: Stage, total: u64);
    /// `n` more units of the current stage are done.
    fn advance(&mut self, n: u64);
}

/// Progress sink that ignores everything (library default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _: Stage, _: u64) {}
    fn advance(&mut self, _: u64) {}
}

/// Method-specific numbers of one explanation (ViT-CX: `n_masks`, `n_feature_maps`), as they
/// go into reports.
pub type Stats = serde_json::Map<String, serde_json::Value>;

/// A finished explanation.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// Softmax probabilities of the clean image `(C)`.
    pub probs: Vec<f32>,
    /// The explained classes, in the order asked.
    pub classes: Vec<usize>,
    /// One saliency map `(H, W)` per explained class, row-major.
    pub saliency: Vec<Vec<f32>>,
    /// Saliency size `(H, W)`: the model's input size.
    pub size: (usize, usize),
    /// The method's own numbers (see [`Stats`]).
    pub stats: Stats,
    /// Seconds per stage, in order.
    pub timings: Vec<(Stage, f64)>,
}

impl Explanation {
    /// A count among [`Explanation::stats`] (`n_masks`, `n_feature_maps`), if the method gave it.
    pub fn count(&self, key: &str) -> Option<usize> {
        self.stats.get(key)?.as_u64().map(|n| n as usize)
    }
}

/// The clean pass over the image a method reads.
#[derive(Debug, Clone, PartialEq)]
pub enum CleanPass {
    /// Probabilities only.
    Probs,
    /// Probabilities and the patch tokens at a tap, as feature maps.
    Features(String),
    /// Probabilities and every block's attention.
    Attention,
    /// Probabilities, the tokens at a tap and the gradient of `score` of each target class with
    /// respect to them: one image per target class.
    Gradient {
        /// The tap.
        tap: String,
        /// What is differentiated.
        score: Score,
    },
}

/// What the clean pass gave; the field of the [`CleanPass`] asked for is set.
#[derive(Debug, Clone)]
pub struct Clean {
    /// Softmax probabilities `(C)`.
    pub probs: Vec<f32>,
    /// Feature maps `(1, D, gh, gw)` ([`CleanPass::Features`]).
    pub features: Option<Tensor>,
    /// Attention of every block ([`CleanPass::Attention`]).
    pub attention: Option<Attention>,
    /// Tokens and gradients, image `k` for target class `k` ([`CleanPass::Gradient`]).
    pub gradient: Option<TapGradient>,
}

/// What a method's step returns: one map per class and its own numbers.
#[derive(Debug, Clone, Default)]
pub struct Maps {
    /// One saliency map `(H, W)` per class asked for, in that order.
    pub maps: Vec<Vec<f32>>,
    /// The method's own numbers.
    pub stats: Stats,
}

impl Maps {
    /// The same map for each of `n` classes, for methods that ignore the class.
    pub fn same_for_each(map: Vec<f32>, n: usize) -> Self {
        Maps {
            maps: vec![map; n],
            stats: Stats::new(),
        }
    }
}

/// An explanation method: which clean pass it reads, and its own step from there to one map
/// per class. Everything else is the driver's ([`explain`]).
pub trait Method: std::fmt::Debug {
    /// The clean pass this method reads.
    fn clean_pass(&self) -> CleanPass;

    /// The method's own step: from the clean pass to one saliency map per class in `classes`
    /// (already resolved and checked). Perturbed passes go through [`Run::perturbed`], stages
    /// through [`Run::stage`].
    fn maps(&self, run: &mut Run<'_>, clean: Clean, classes: &[usize]) -> Result<Maps>;

    /// The settings as JSON, for reports.
    fn params_json(&self) -> serde_json::Value;

    /// One line on how a map was made, for legends and logs.
    fn describe(&self, ex: &Explanation) -> String;

    /// Explains `x` `(3, H, W)` (normalised pixels) for `targets` with this method: the driver
    /// ([`explain`]) for a single image.
    fn explain(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        targets: &Targets,
        progress: &mut dyn Progress,
    ) -> Result<Explanation>
    where
        Self: Sized,
    {
        explain(self, model, x, targets, 0, progress)
    }
}

/// One explanation in progress: the model, the checked input, progress and timings.
pub struct Run<'a> {
    /// The model.
    pub model: &'a dyn Backbone,
    /// The image `(3, H, W)`, normalised, at the model's input size.
    pub x: &'a [f32],
    /// `(H, W)`.
    pub size: (usize, usize),
    /// The image's position in a data set (the `random` control seeds its map with it).
    pub index: u64,
    progress: &'a mut dyn Progress,
    timings: Vec<(Stage, f64)>,
}

impl<'a> Run<'a> {
    /// A run over `x` `(3, H, W)`, which must have the model's input size.
    pub fn new(
        model: &'a dyn Backbone,
        x: &'a [f32],
        index: u64,
        progress: &'a mut dyn Progress,
    ) -> Result<Self> {
        let size = model.spec().input_size;
        check_input(x, size)?;
        Ok(Run {
            model,
            x,
            size,
            index,
            progress,
            timings: Vec::new(),
        })
    }

    /// Continues a run whose earlier stages took `timings` (a method split in two calls).
    pub fn with_timings(mut self, timings: Vec<(Stage, f64)>) -> Self {
        self.timings = timings;
        self
    }

    /// The seconds per stage so far.
    pub fn timings(&self) -> &[(Stage, f64)] {
        &self.timings
    }

    /// The input as a batch of one `(1, 3, H, W)` on the model's device.
    pub fn input_tensor(&self) -> Result<Tensor> {
        let (h, w) = self.size;
        Ok(Tensor::from_slice(
            self.x,
            (1, 3, h, w),
            self.model.device(),
        )?)
    }

    /// Runs `f` as one stage of one unit: timed, and shown as progress.
    pub fn stage<T>(&mut self, stage: Stage, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.progress.start(stage, 1);
        let t = Instant::now();
        let out = f()?;
        self.timings.push((stage, t.elapsed().as_secs_f64()));
        self.progress.advance(1);
        Ok(out)
    }

    /// The clean pass `pass` over the image, timed as [`Stage::FORWARD`], and `targets`
    /// resolved against its probabilities.
    pub fn clean(&mut self, pass: &CleanPass, targets: &Targets) -> Result<(Clean, Vec<usize>)> {
        let model = self.model;
        let px = self.input_tensor()?;
        self.progress.start(Stage::FORWARD, 1);
        let t = Instant::now();
        let mut clean = Clean {
            probs: Vec::new(),
            features: None,
            attention: None,
            gradient: None,
        };
        let classes = match pass {
            CleanPass::Probs => {
                clean.probs = probs_of(&model.forward(&px, None)?.logits)?;
                targets.resolve(&clean.probs)?
            }
            CleanPass::Features(tap) => {
                let out = model.forward(&px, Some(tap))?;
                clean.probs = probs_of(&out.logits)?;
                clean.features = Some(out.features.ok_or_else(|| {
                    Error::Unsupported(format!("model returned no feature maps at tap '{tap}'"))
                })?);
                targets.resolve(&clean.probs)?
            }
            CleanPass::Attention => {
                let att = model.attention(&px)?;
                clean.probs = probs_of(&att.logits)?;
                clean.attention = Some(att);
                targets.resolve(&clean.probs)?
            }
            CleanPass::Gradient { tap, score } => {
                let (g, probs, classes) = gradient(model, &px, tap, *score, targets)?;
                clean.probs = probs;
                clean.gradient = Some(g);
                classes
            }
        };
        self.timings
            .push((Stage::FORWARD, t.elapsed().as_secs_f64()));
        self.progress.advance(1);
        Ok((clean, classes))
    }

    /// Runs `units` perturbations through the model, `batch` images per pass, timed as
    /// [`Stage::PERTURBED_FORWARD`] with progress per image.
    ///
    /// Each unit has `per_unit` images (ViT-CX: the masked image and the noisy original):
    /// `fill(unit, images)` appends image `k` of the unit, `(3, H, W)` values, to `images[k]`;
    /// `take(unit, probs)` receives the unit's class probabilities, `probs[k]` for image `k`.
    /// A pass holds whole units, kind after kind (`[k=0 of units a..b, k=1 of units a..b]`), so
    /// no unit is split across passes. When `fill_stage` is given, the time spent in `fill` is
    /// recorded under it instead (RISE's mask generation).
    #[allow(clippy::too_many_arguments)]
    pub fn perturbed(
        &mut self,
        units: usize,
        per_unit: usize,
        batch: usize,
        precision: Precision,
        fill_stage: Option<Stage>,
        mut fill: impl FnMut(usize, &mut [Vec<f32>]) -> Result<()>,
        mut take: impl FnMut(usize, &[&[f32]]) -> Result<()>,
    ) -> Result<()> {
        if batch == 0 || per_unit == 0 {
            return Err(Error::invalid(
                "batch size 0 out of range; expected at least 1",
            ));
        }
        let model = self.model;
        let (h, w) = self.size;
        let plane = 3 * h * w;
        let chunk = (batch / per_unit).max(1);
        self.progress
            .start(Stage::PERTURBED_FORWARD, (units * per_unit) as u64);
        let t = Instant::now();
        let mut fill_s = 0.0;
        for start in (0..units).step_by(chunk) {
            let end = (start + chunk).min(units);
            let count = end - start;
            let tf = Instant::now();
            let mut kinds: Vec<Vec<f32>> = (0..per_unit)
                .map(|_| Vec::with_capacity(count * plane))
                .collect();
            for u in start..end {
                fill(u, &mut kinds)?;
            }
            if let Some(bad) = kinds.iter().find(|k| k.len() != count * plane) {
                return Err(Error::invalid(format!(
                    "perturbed images hold {} values; expected {count} x 3 x {h} x {w}",
                    bad.len()
                )));
            }
            let data: Vec<f32> = match kinds.len() {
                1 => kinds.pop().unwrap_or_default(),
                _ => kinds.concat(),
            };
            fill_s += tf.elapsed().as_secs_f64();
            let px = Tensor::from_vec(data, (count * per_unit, 3, h, w), model.device())?;
            let probs = model.probs_at(&px, precision)?.to_vec2::<f32>()?;
            for (i, u) in (start..end).enumerate() {
                let rows: Vec<&[f32]> = (0..per_unit)
                    .map(|k| probs[k * count + i].as_slice())
                    .collect();
                take(u, &rows)?;
            }
            self.progress.advance((count * per_unit) as u64);
        }
        let total = t.elapsed().as_secs_f64();
        match fill_stage {
            Some(stage) => {
                self.timings.push((stage, fill_s));
                self.timings
                    .push((Stage::PERTURBED_FORWARD, total - fill_s));
            }
            None => self.timings.push((Stage::PERTURBED_FORWARD, total)),
        }
        Ok(())
    }

    /// The explanation, once the method's step is done.
    pub fn finish(self, probs: Vec<f32>, classes: Vec<usize>, maps: Maps) -> Result<Explanation> {
        if maps.maps.len() != classes.len() {
            return Err(Error::invalid(format!(
                "the method made {} maps for {} classes",
                maps.maps.len(),
                classes.len()
            )));
        }
        let (h, w) = self.size;
        if let Some(bad) = maps.maps.iter().find(|m| m.len() != h * w) {
            return Err(Error::invalid(format!(
                "the method made a map of {} values; expected {h} x {w}",
                bad.len()
            )));
        }
        Ok(Explanation {
            probs,
            classes,
            saliency: maps.maps,
            size: self.size,
            stats: maps.stats,
            timings: self.timings,
        })
    }
}

/// Explains `x` `(3, H, W)` (normalised pixels, the model's input size) with `method` for
/// `targets`. `index` is the image's position in a data set (only the `random` control uses
/// it).
pub fn explain(
    method: &dyn Method,
    model: &dyn Backbone,
    x: &[f32],
    targets: &Targets,
    index: u64,
    progress: &mut dyn Progress,
) -> Result<Explanation> {
    let mut run = Run::new(model, x, index, progress)?;
    let (clean, classes) = run.clean(&method.clean_pass(), targets)?;
    let probs = clean.probs.clone();
    let maps = method.maps(&mut run, clean, &classes)?;
    run.finish(probs, classes, maps)
}

/// The gradient pass and its probabilities and classes: the top-1 class comes from the
/// gradient pass itself; other targets need a clean pass first, then one image per class in
/// one batch.
fn gradient(
    model: &dyn Backbone,
    px: &Tensor,
    tap: &str,
    score: Score,
    targets: &Targets,
) -> Result<(TapGradient, Vec<f32>, Vec<usize>)> {
    if let Targets::TopK(1) = targets {
        let mut chosen = Vec::new();
        let g = model.tap_gradient(px, tap, &mut |logits| {
            chosen = logits.to_vec2::<f32>()?.iter().map(|r| argmax(r)).collect();
            score.of(logits, &chosen)
        })?;
        let probs = probs_of(&g.logits)?;
        return Ok((g, probs, chosen));
    }
    let probs = probs_of(&model.forward(px, None)?.logits)?;
    let classes = targets.resolve(&probs)?;
    let batch = px.repeat((classes.len(), 1, 1, 1))?;
    let g = model.tap_gradient(&batch, tap, &mut |logits| score.of(logits, &classes))?;
    Ok((g, probs, classes))
}

/// Fails unless `x` holds `3 x H x W` values.
pub fn check_input(x: &[f32], (h, w): (usize, usize)) -> Result<()> {
    if x.len() != 3 * h * w {
        return Err(Error::invalid(format!(
            "input has {} values; expected 3 x {h} x {w} = {}",
            x.len(),
            3 * h * w
        )));
    }
    Ok(())
}

/// The most images one batched forward pass may hold (`--batch` of every method and of the
/// curves): beyond it a batch of ViT-B/16 needs gigabytes and gains nothing.
pub const MAX_BATCH: usize = 1024;

/// Fails unless `1 <= batch <= MAX_BATCH`; `what` names the flag's meaning.
pub fn check_batch(batch: usize, what: &str) -> Result<()> {
    if batch == 0 || batch > MAX_BATCH {
        return Err(Error::invalid(format!(
            "{what} {batch} out of range; expected 1 to {MAX_BATCH}"
        )));
    }
    Ok(())
}

/// Softmax probabilities `(C)` of one image from its logits `(1, C)`; non-finite logits are an
/// error (an explanation of NaN is not an answer).
pub fn probs_of(logits: &Tensor) -> Result<Vec<f32>> {
    let p = candle_nn::ops::softmax_last_dim(logits)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if p.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "the model's output for this image is not finite (NaN or infinite logits)",
        ));
    }
    Ok(p)
}
