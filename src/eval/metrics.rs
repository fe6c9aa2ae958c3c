//! Faithfulness metrics for saliency maps: deletion and insertion curves with their AUC
//! (Petsiuk et al., "RISE", BMVC 2018, <https://arxiv.org/abs/1806.07421>), the pointing game
//! (Zhang et al., 2016) and the energy-based pointing game (Wang et al., "Score-CAM", 2020), plus a
//! mean with a 95% confidence interval for summaries. ViT-CX (Xie et al., IJCAI 2023) reports
//! deletion and insertion AUC; every forward pass goes through [`Backbone`], batched.
//!
//! Departures from RISE's code, each on purpose:
//! - the blur pads by reflection (RISE's `conv2d(padding=klen//2)` pads with zeros, which darkens
//!   the border towards the dataset mean) and uses a sampled, normalised Gaussian (RISE filters a
//!   delta with `scipy.ndimage.gaussian_filter`, nearly the same 11x11 weights);
//! - the AUC integrates over the true fraction of pixels changed, so a last partial step counts
//!   for its real width (with `H*W` divisible by the step this equals RISE's `auc`).

use serde_json::json;

use crate::error::{Error, Result};
use crate::methods::{NoProgress, Run};
use crate::model::{Backbone, Precision};

/// The image a curve moves towards (deletion) or starts from (insertion), in normalised space.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Baseline {
    /// All zeros in normalised space, i.e. every pixel at the dataset mean.
    Zero,
    /// A Gaussian blur of the image, per channel in normalised space: a separable kernel of
    /// `kernel` taps (odd) with standard deviation `sigma` pixels, borders padded by reflection
    /// without repeating the edge pixel (`d c b | a b c d | c b a`, PyTorch's `reflect`).
    Blur {
        /// Kernel width and height in pixels (odd, at least 1). RISE: 11.
        kernel: usize,
        /// Standard deviation in pixels (positive, finite). RISE: 5.
        sigma: f32,
    },
    /// The same scene without the object (`vitcx synth` renders it with the same background,
    /// clutter and noise), preprocessed like the image: deletion ends at, and insertion starts
    /// from, the true absence of the object rather than a blur or a grey that no training image
    /// looked like. Only data that provides it can use it ([`deletion_with`], [`insertion_with`]).
    Background,
}

impl Baseline {
    /// RISE's insertion baseline: blur with an 11-tap kernel, sigma 5.
    pub const RISE_BLUR: Baseline = Baseline::Blur {
        kernel: 11,
        sigma: 5.0,
    };

    /// Short name for reports: `zero`, `blur` or `background`.
    pub fn name(&self) -> &'static str {
        match self {
            Baseline::Zero => "zero",
            Baseline::Blur { .. } => "blur",
            Baseline::Background => "background",
        }
    }

    /// A baseline by name: `zero`, `blur` with `kernel` taps and `sigma` (checked), or
    /// `background`.
    pub fn parse(name: &str, kernel: usize, sigma: f32) -> Result<Self> {
        match name {
            "zero" => Ok(Baseline::Zero),
            "blur" => {
                gaussian_kernel(kernel, sigma)?;
                Ok(Baseline::Blur { kernel, sigma })
            }
            "background" => Ok(Baseline::Background),
            other => Err(Error::invalid(format!(
                "unknown baseline '{other}'; expected zero, blur or background"
            ))),
        }
    }

    /// How reports describe the baseline.
    pub fn report_json(&self) -> serde_json::Value {
        match *self {
            Baseline::Zero => json!({ "kind": "zero" }),
            Baseline::Blur { kernel, sigma } => json!({
                "kind": "blur", "kernel": kernel,
                // Through its shortest decimal form, so 5f32 reads 5.0 and 0.1f32 reads 0.1.
                "sigma": sigma.to_string().parse::<f64>().unwrap_or(f64::NAN),
                "border": "reflect (edge pixel not repeated)", "space": "normalised, per channel",
            }),
            Baseline::Background => json!({
                "kind": "background",
                "image": "the scene without the object, preprocessed like the image",
            }),
        }
    }

    /// The baseline image for `x` `(3, H, W)` (normalised), same layout. [`Baseline::Background`]
    /// is not made from `x`: it fails here ([`Baseline::apply_with`] takes it).
    pub fn apply(&self, x: &[f32], size: (usize, usize)) -> Result<Vec<f32>> {
        self.apply_with(x, size, None)
    }

    /// [`Baseline::apply`], with the object-free image `background` `(3, H, W)` (normalised)
    /// where the data has one; [`Baseline::Background`] fails without it.
    pub fn apply_with(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        background: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        check_len("image", x.len(), 3 * h * w)?;
        match *self {
            Baseline::Zero => Ok(vec![0.0; x.len()]),
            Baseline::Blur { kernel, sigma } => {
                let k = gaussian_kernel(kernel, sigma)?;
                Ok(x.chunks(h * w)
                    .flat_map(|plane| blur_plane(plane, (h, w), &k))
                    .collect())
            }
            Baseline::Background => {
                let b = background.ok_or_else(|| {
                    Error::invalid(
                        "the background baseline needs the image without its object, which \
                         this image does not have (vitcx synth writes one per image)",
                    )
                })?;
                check_len("background", b.len(), x.len())?;
                Ok(b.to_vec())
            }
        }
    }
}

/// Deletion/insertion settings (RISE, Petsiuk et al. 2018): pixels ranked by saliency (most
/// salient first, ties by lower row-major index), `step` pixels changed per step; deletion
/// replaces pixels with `deletion_baseline`, insertion starts from `insertion_baseline` and puts
/// the original pixels back. `batch` perturbed images go through the model per forward pass.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurveParams {
    /// Pixels changed per step. Default 224 (RISE).
    pub step: usize,
    /// What deleted pixels become. Default [`Baseline::Zero`] (RISE: zeros = the mean).
    pub deletion_baseline: Baseline,
    /// Where insertion starts. Default [`Baseline::RISE_BLUR`] (kernel 11, sigma 5).
    pub insertion_baseline: Baseline,
    /// Perturbed images per forward pass. Default 32.
    pub batch: usize,
}

impl CurveParams {
    /// The settings as they go into reports.
    pub fn report_json(&self) -> serde_json::Value {
        json!({
            "step": self.step,
            "batch": self.batch,
            "deletion_baseline": self.deletion_baseline.report_json(),
            "insertion_baseline": self.insertion_baseline.report_json(),
            "pixel_order": "saliency descending, ties by lower row-major index",
            "auc": "trapezoid rule over the fraction of pixels changed, x in [0, 1]",
        })
    }

    /// Fails unless the step and batch are at least 1.
    pub fn check(&self) -> Result<()> {
        if self.step == 0 {
            return Err(Error::invalid("curve step 0; expected at least 1 pixel"));
        }
        crate::methods::driver::check_batch(self.batch, "curve batch")?;
        Ok(())
    }
}

impl Default for CurveParams {
    fn default() -> Self {
        Self {
            step: 224,
            deletion_baseline: Baseline::Zero,
            insertion_baseline: Baseline::RISE_BLUR,
            batch: 32,
        }
    }
}

/// A probability curve and its area under the curve normalised to [0, 1] (trapezoid rule over
/// the x axis [0, 1]).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Probability of the class after each step; `probs[0]` before any pixel changes.
    pub probs: Vec<f32>,
    /// Fraction of pixels changed at each point, from 0 to 1 (same length as `probs`).
    pub x: Vec<f64>,
    /// Area under the curve, trapezoid rule over `x`.
    pub auc: f64,
}

/// Deletion curve: the class probability as the most salient pixels of `x` `(3, H, W)`
/// (normalised, `(H, W)` = the model's input size) are replaced, `p.step` at a time, by the
/// deletion baseline. Lower AUC = more faithful saliency `(H, W)`.
pub fn deletion(
    model: &dyn Backbone,
    x: &[f32],
    saliency: &[f32],
    class: usize,
    p: &CurveParams,
) -> Result<Curve> {
    deletion_with(model, x, None, saliency, class, p)
}

/// [`deletion`] with the image's object-free `background` `(3, H, W)` (normalised) where the
/// data has one, for [`Baseline::Background`].
pub fn deletion_with(
    model: &dyn Backbone,
    x: &[f32],
    background: Option<&[f32]>,
    saliency: &[f32],
    class: usize,
    p: &CurveParams,
) -> Result<Curve> {
    let size = check_inputs(model, x, saliency, class, p)?;
    let base = p.deletion_baseline.apply_with(x, size, background)?;
    curve(model, x, &base, saliency, class, size, p)
}

/// Insertion curve: the class probability as the most salient pixels of `x` `(3, H, W)` are put
/// back, `p.step` at a time, into the insertion baseline. Higher AUC = more faithful saliency.
pub fn insertion(
    model: &dyn Backbone,
    x: &[f32],
    saliency: &[f32],
    class: usize,
    p: &CurveParams,
) -> Result<Curve> {
    insertion_with(model, x, None, saliency, class, p)
}

/// [`insertion`] with the image's object-free `background` `(3, H, W)` (normalised) where the
/// data has one, for [`Baseline::Background`].
pub fn insertion_with(
    model: &dyn Backbone,
    x: &[f32],
    background: Option<&[f32]>,
    saliency: &[f32],
    class: usize,
    p: &CurveParams,
) -> Result<Curve> {
    let size = check_inputs(model, x, saliency, class, p)?;
    let base = p.insertion_baseline.apply_with(x, size, background)?;
    curve(model, &base, x, saliency, class, size, p)
}

/// Area under `y` over `x` by the trapezoid rule (`x` increasing, normally from 0 to 1);
/// 0 for fewer than two points or mismatched lengths.
pub fn auc(x: &[f64], y: &[f32]) -> f64 {
    if x.len() != y.len() || x.len() < 2 {
        return 0.0;
    }
    x.windows(2)
        .zip(y.windows(2))
        .map(|(xs, ys)| (xs[1] - xs[0]) * (f64::from(ys[0]) + f64::from(ys[1])) / 2.0)
        .sum()
}

/// Pointing game: is the saliency maximum (any of the tied maxima) inside the object mask?
/// `mask` `(H, W)`: nonzero = inside. NaN saliency values are ignored; false when the lengths
/// differ, the map is empty or all NaN.
pub fn pointing_game(saliency: &[f32], mask: &[u8]) -> bool {
    if saliency.len() != mask.len() {
        return false;
    }
    let max = max_ignoring_nan(saliency);
    saliency.iter().zip(mask).any(|(&s, &m)| s == max && m != 0)
}

/// The largest value, NaN ignored; -inf for an empty or all-NaN map (which no value equals
/// except -inf itself, so the pointing games count no hit there).
fn max_ignoring_nan(saliency: &[f32]) -> f32 {
    saliency
        .iter()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// The pointing game's tolerance as Zhang et al. define it ("Top-down Neural Attention by
/// Excitation Backprop", ECCV 2016): a hit within 15 px of the object counts, since a map's
/// maximum is only as precise as its resolution (ViT-CX's is one 16-px patch).
pub const POINTING_TOLERANCE_PX: f64 = 15.0;

/// Pointing game with a tolerance: is a saliency maximum (any of the tied maxima) within
/// `tolerance` pixels (Euclidean, pixel centres) of an object pixel? `mask` and `saliency` are
/// `(H, W)` with `W = width`; [`pointing_game`] is the case `tolerance = 0`. False when the
/// lengths differ, `width` does not divide them, or the map is empty or all NaN.
pub fn pointing_game_within(saliency: &[f32], mask: &[u8], width: usize, tolerance: f64) -> bool {
    if saliency.len() != mask.len() || width == 0 || !saliency.len().is_multiple_of(width) {
        return false;
    }
    let height = saliency.len() / width;
    let max = max_ignoring_nan(saliency);
    let reach = tolerance.max(0.0).floor() as usize;
    let near = |i: usize| {
        let (y, x) = (i / width, i % width);
        let rows = y.saturating_sub(reach)..(y + reach + 1).min(height);
        rows.into_iter().any(|yy| {
            let cols = x.saturating_sub(reach)..(x + reach + 1).min(width);
            cols.into_iter().any(|xx| {
                let (dy, dx) = (yy.abs_diff(y) as f64, xx.abs_diff(x) as f64);
                mask[yy * width + xx] != 0 && dy * dy + dx * dx <= tolerance * tolerance
            })
        })
    };
    saliency
        .iter()
        .enumerate()
        .any(|(i, &s)| s == max && near(i))
}

/// Energy-based pointing game on the map as it is: share of the positive saliency mass inside
/// the mask (Score-CAM's ratio, with negative values counted as 0), 0 if there is no positive
/// mass or the lengths differ. NaN values count as 0. A map with an offset (positive
/// everywhere, as causal scores are) puts most of its mass outside a small object whatever it
/// points at; [`energy_pointing_game_minmax`] scores the map as Score-CAM does.
pub fn energy_pointing_game(saliency: &[f32], mask: &[u8]) -> f64 {
    if saliency.len() != mask.len() {
        return 0.0;
    }
    let (mut inside, mut total) = (0f64, 0f64);
    for (&s, &m) in saliency.iter().zip(mask) {
        if s > 0.0 {
            total += f64::from(s);
            if m != 0 {
                inside += f64::from(s);
            }
        }
    }
    if total > 0.0 {
        inside / total
    } else {
        0.0
    }
}

/// Energy-based pointing game as Score-CAM (Wang et al., CVPR-W 2020) scores it: on the map
/// min-max normalised to [0, 1] first, so an offset common to every pixel carries no energy.
/// NaN values are ignored for the range and count as 0; a constant map (no range) scores 0, as
/// do mismatched lengths.
pub fn energy_pointing_game_minmax(saliency: &[f32], mask: &[u8]) -> f64 {
    if saliency.len() != mask.len() {
        return 0.0;
    }
    let (lo, hi) = saliency
        .iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(f64::from(v)), hi.max(f64::from(v)))
        });
    if hi <= lo {
        return 0.0;
    }
    let (mut inside, mut total) = (0f64, 0f64);
    for (&s, &m) in saliency.iter().zip(mask) {
        if s.is_finite() {
            let v = (f64::from(s) - lo) / (hi - lo);
            total += v;
            if m != 0 {
                inside += v;
            }
        }
    }
    inside / total
}

/// Mean and 95% confidence interval: `mean +- t * s / sqrt(n)` with the sample standard deviation
/// `s` and Student's t quantile 0.975 for `n - 1` degrees of freedom (exact table up to 30,
/// Cornish-Fisher expansion beyond). `n = 1` gives `[mean, mean]`; `n = 0` gives NaN.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Arithmetic mean.
    pub mean: f64,
    /// 95% confidence interval of the mean, `[low, high]`.
    pub ci95: [f64; 2],
    /// Number of values.
    pub n: usize,
}

/// Summarises `values` (see [`Summary`]).
pub fn summarize(values: &[f64]) -> Summary {
    let n = values.len();
    if n == 0 {
        return Summary {
            mean: f64::NAN,
            ci95: [f64::NAN; 2],
            n,
        };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Summary {
            mean,
            ci95: [mean, mean],
            n,
        };
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    Summary {
        mean,
        ci95: [mean - half, mean + half],
        n,
    }
}

/// Summarises a share of successes (`values` of 0 and 1: pointing hits, correct predictions)
/// with the Wilson score interval at 95%: unlike `mean +- t s / sqrt(n)` it stays inside
/// [0, 1] and does not shrink to a point when every value is the same (3 hits of 3 give
/// [0.44, 1], not [1, 1]). `n = 0` gives NaN.
pub fn summarize_share(values: &[f64]) -> Summary {
    let n = values.len();
    if n == 0 {
        return summarize(values);
    }
    let p = values.iter().sum::<f64>() / n as f64;
    let (z, nf) = (1.959_963_984_540_054_f64, n as f64);
    let z2n = z * z / nf;
    let centre = (p + z2n / 2.0) / (1.0 + z2n);
    let half = z / (1.0 + z2n) * (p * (1.0 - p) / nf + z2n / (4.0 * nf)).sqrt();
    Summary {
        mean: p,
        ci95: [(centre - half).max(0.0), (centre + half).min(1.0)],
        n,
    }
}

/// Pearson correlation of two equally long series (NaN if either is constant).
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let ma = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let mb = b.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (f64::from(x) - ma, f64::from(y) - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

/// Student's t quantile 0.975 with `df >= 1` degrees of freedom.
fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    if (1..=30).contains(&df) {
        return TABLE[df - 1];
    }
    // Cornish-Fisher expansion around the normal quantile (error < 1e-4 for df > 30).
    let z = 1.959_963_984_540_054_f64;
    let v = df.max(1) as f64;
    z + (z.powi(3) + z) / (4.0 * v)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * v.powi(3))
}

/// The widest blur kernel of a curve baseline (RISE's is 11; wider than twice a 224 px image
/// only costs time).
pub const MAX_BLUR_KERNEL: usize = 449;
/// The largest blur sigma of a curve baseline (RISE's is 5).
pub const MAX_BLUR_SIGMA: f32 = 1000.0;

/// A normalised 1-D Gaussian of `kernel` taps (odd) and standard deviation `sigma`; sums to 1.
pub fn gaussian_kernel(kernel: usize, sigma: f32) -> Result<Vec<f32>> {
    if kernel == 0 || kernel.is_multiple_of(2) || kernel > MAX_BLUR_KERNEL {
        return Err(Error::invalid(format!(
            "blur kernel {kernel}; expected an odd size from 1 to {MAX_BLUR_KERNEL}"
        )));
    }
    if !(sigma.is_finite() && sigma > 0.0 && sigma <= MAX_BLUR_SIGMA) {
        return Err(Error::invalid(format!(
            "blur sigma {sigma}; expected a value above 0 and at most {MAX_BLUR_SIGMA}"
        )));
    }
    let r = (kernel / 2) as f64;
    let s = f64::from(sigma);
    let w: Vec<f64> = (0..kernel)
        .map(|i| (-(i as f64 - r).powi(2) / (2.0 * s * s)).exp())
        .collect();
    let total: f64 = w.iter().sum();
    Ok(w.iter().map(|v| (v / total) as f32).collect())
}

/// Index `i` (may be out of range) reflected into `0..n` without repeating the edge (`n >= 1`).
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// Separable blur of one `(H, W)` plane with kernel `k` (odd length), reflect padding.
fn blur_plane(plane: &[f32], (h, w): (usize, usize), k: &[f32]) -> Vec<f32> {
    let r = (k.len() / 2) as isize;
    let mut rows = vec![0f32; h * w];
    for y in 0..h {
        let src = &plane[y * w..(y + 1) * w];
        for x in 0..w {
            rows[y * w + x] = k
                .iter()
                .enumerate()
                .map(|(j, &kw)| kw * src[reflect(x as isize + j as isize - r, w)])
                .sum();
        }
    }
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = k
                .iter()
                .enumerate()
                .map(|(j, &kw)| kw * rows[reflect(y as isize + j as isize - r, h) * w + x])
                .sum();
        }
    }
    out
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(format!(
            "{what} has {got} values; expected {want}"
        )));
    }
    Ok(())
}

fn check_inputs(
    model: &dyn Backbone,
    x: &[f32],
    saliency: &[f32],
    class: usize,
    p: &CurveParams,
) -> Result<(usize, usize)> {
    let spec = model.spec();
    let (h, w) = spec.input_size;
    check_len("image", x.len(), 3 * h * w)?;
    check_len("saliency", saliency.len(), h * w)?;
    if let Some(i) = saliency.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "saliency value {} at index {i}; expected finite values",
            saliency[i]
        )));
    }
    if class >= spec.num_classes {
        return Err(Error::invalid(format!(
            "class {class} out of range; model has {} classes",
            spec.num_classes
        )));
    }
    p.check()?;
    Ok((h, w))
}

/// The curve from `start` to `end` `(3, H, W)`: point k has the `k * step` most salient pixels
/// taken from `end`, the rest from `start`. Images are built incrementally (each point copies the
/// previous one and changes `step` pixels) and sent through the model `batch` at a time.
fn curve(
    model: &dyn Backbone,
    start: &[f32],
    end: &[f32],
    saliency: &[f32],
    class: usize,
    (h, w): (usize, usize),
    p: &CurveParams,
) -> Result<Curve> {
    let hw = h * w;
    let mut order: Vec<usize> = (0..hw).collect();
    order.sort_by(|&a, &b| saliency[b].total_cmp(&saliency[a]).then(a.cmp(&b)));
    let n_steps = hw.div_ceil(p.step);
    let n_points = n_steps + 1;
    let changed = |k: usize| (k * p.step).min(hw);
    let x: Vec<f64> = (0..n_points)
        .map(|k| changed(k) as f64 / hw as f64)
        .collect();

    let mut current = start.to_vec();
    let mut probs = Vec::with_capacity(n_points);
    let mut progress = NoProgress;
    let mut run = Run::new(model, start, 0, &mut progress)?;
    run.perturbed(
        n_points,
        1,
        p.batch,
        Precision::F32,
        None,
        |k, images| {
            if k > 0 {
                for &i in &order[changed(k - 1)..changed(k)] {
                    for c in 0..3 {
                        current[c * hw + i] = end[c * hw + i];
                    }
                }
            }
            images[0].extend_from_slice(&current);
            Ok(())
        },
        |_, rows| {
            probs.push(rows[0][class]);
            Ok(())
        },
    )?;
    let auc = auc(&x, &probs);
    Ok(Curve { probs, x, auc })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn model() -> Box<dyn Backbone> {
        crate::model::load(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vit_timm").as_ref(),
            &Device::Cpu,
        )
        .unwrap()
    }

    fn input(m: &dyn Backbone) -> Vec<f32> {
        let img = crate::image::load_rgb(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/vit_timm/image_224.png"
            )
            .as_ref(),
        )
        .unwrap();
        let pre = &m.spec().preprocess;
        let img = crate::image::resize_bilinear(&img, m.spec().input_size);
        crate::image::to_input(&img, pre.mean, pre.std)
    }

    fn prob(m: &dyn Backbone, x: &[f32], class: usize) -> f32 {
        let (h, w) = m.spec().input_size;
        let px = Tensor::from_vec(x.to_vec(), (1, 3, h, w), &Device::Cpu).unwrap();
        m.probs(&px)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[class]
    }

    /// A saliency with a structure (a diagonal ramp) so the ranking is not trivial.
    fn ramp(hw: (usize, usize)) -> Vec<f32> {
        (0..hw.0 * hw.1)
            .map(|i| ((i / hw.1) * 7 + (i % hw.1) * 3) as f32 % 101.0)
            .collect()
    }

    #[test]
    fn auc_of_constant_curve_is_the_constant() {
        let x: Vec<f64> = (0..=10).map(|k| k as f64 / 10.0).collect();
        assert!((auc(&x, &[0.37; 11]) - 0.37).abs() < 1e-7);
    }

    #[test]
    fn auc_three_points_by_hand() {
        // (0, 1), (0.5, 0.5), (1, 0): 0.5 * 0.75 + 0.5 * 0.25 = 0.5.
        assert!((auc(&[0.0, 0.5, 1.0], &[1.0, 0.5, 0.0]) - 0.5).abs() < 1e-12);
        // (0, 0), (0.25, 1), (1, 1): 0.25 * 0.5 + 0.75 * 1 = 0.875.
        assert!((auc(&[0.0, 0.25, 1.0], &[0.0, 1.0, 1.0]) - 0.875).abs() < 1e-12);
        assert_eq!(auc(&[0.0], &[1.0]), 0.0);
    }

    #[test]
    fn gaussian_kernel_sums_to_one_and_is_symmetric() {
        let k = gaussian_kernel(11, 5.0).unwrap();
        assert_eq!(k.len(), 11);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((k[0] - k[10]).abs() < 1e-9 && k[5] > k[4] && k[4] > k[0]);
        assert!(gaussian_kernel(10, 5.0).is_err());
        assert!(gaussian_kernel(11, 0.0).is_err());
    }

    #[test]
    fn blur_keeps_a_constant_image_and_smooths_a_spike() {
        let (h, w) = (7, 9);
        let x = vec![0.75f32; 3 * h * w];
        let b = Baseline::RISE_BLUR.apply(&x, (h, w)).unwrap();
        assert!(b.iter().all(|v| (v - 0.75).abs() < 1e-5));
        let mut spike = vec![0f32; 3 * h * w];
        spike[3 * w + 4] = 1.0;
        let b = Baseline::Blur {
            kernel: 3,
            sigma: 1.0,
        }
        .apply(&spike, (h, w))
        .unwrap();
        // Interior spike: mass conserved, peak lowered, neighbours raised, other channels zero.
        assert!((b[..h * w].iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(b[3 * w + 4] < 1.0 && b[3 * w + 5] > 0.0 && b[2 * w + 3] > 0.0);
        assert!(b[h * w..].iter().all(|&v| v == 0.0));
        assert_eq!(reflect(-1, 5), 1);
        assert_eq!(reflect(5, 5), 3);
        assert_eq!(reflect(-3, 2), 1);
    }

    #[test]
    fn deletion_goes_from_clean_to_baseline_probability() {
        let m = model();
        let x = input(&m);
        let (h, w) = m.spec().input_size;
        let class = 3;
        let p = CurveParams {
            step: 224 * 28,
            batch: 4,
            ..CurveParams::default()
        };
        let c = deletion(&m, &x, &ramp((h, w)), class, &p).unwrap();
        assert_eq!(c.probs.len(), 224 * 224 / (224 * 28) + 1);
        assert_eq!(c.x.first(), Some(&0.0));
        assert_eq!(c.x.last(), Some(&1.0));
        assert!((c.probs[0] - prob(&m, &x, class)).abs() < 1e-5);
        let zero = vec![0f32; x.len()];
        assert!((c.probs[c.probs.len() - 1] - prob(&m, &zero, class)).abs() < 1e-5);
        assert!((c.auc - auc(&c.x, &c.probs)).abs() < 1e-12);
        // Batching does not change the numbers.
        let one = deletion(&m, &x, &ramp((h, w)), class, &CurveParams { batch: 1, ..p }).unwrap();
        for (a, b) in one.probs.iter().zip(&c.probs) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn insertion_goes_from_baseline_to_clean_probability() {
        let m = model();
        let x = input(&m);
        let (h, w) = m.spec().input_size;
        let class = 1;
        let p = CurveParams {
            step: 224 * 28 + 5, // a partial last step
            ..CurveParams::default()
        };
        let c = insertion(&m, &x, &ramp((h, w)), class, &p).unwrap();
        assert_eq!(c.probs.len(), (224usize * 224).div_ceil(p.step) + 1);
        let blurred = Baseline::RISE_BLUR.apply(&x, (h, w)).unwrap();
        assert!((c.probs[0] - prob(&m, &blurred, class)).abs() < 1e-5);
        assert!((c.probs[c.probs.len() - 1] - prob(&m, &x, class)).abs() < 1e-5);
        // Mid-curve point k has exactly the k*step most salient pixels from the image.
        let sal = ramp((h, w));
        let mut order: Vec<usize> = (0..h * w).collect();
        order.sort_by(|&a, &b| sal[b].total_cmp(&sal[a]).then(a.cmp(&b)));
        let mut mid = blurred.clone();
        for &i in &order[..2 * p.step] {
            for ch in 0..3 {
                mid[ch * h * w + i] = x[ch * h * w + i];
            }
        }
        assert!((c.probs[2] - prob(&m, &mid, class)).abs() < 1e-5);
    }

    #[test]
    fn curve_rejects_bad_inputs() {
        let m = model();
        let x = input(&m);
        let p = CurveParams::default();
        assert!(deletion(&m, &x, &[0.0; 10], 0, &p).is_err());
        assert!(deletion(&m, &x, &vec![0.0; 224 * 224], 10, &p).is_err());
        let p0 = CurveParams { step: 0, ..p };
        assert!(insertion(&m, &x, &vec![0.0; 224 * 224], 0, &p0).is_err());
    }

    #[test]
    fn pointing_game_on_hand_made_maps() {
        let mask = [0u8, 0, 1, 1];
        assert!(pointing_game(&[0.1, 0.2, 0.9, 0.3], &mask));
        assert!(!pointing_game(&[0.9, 0.2, 0.1, 0.3], &mask));
        // Tied maxima: one inside is enough.
        assert!(pointing_game(&[0.9, 0.2, 0.1, 0.9], &mask));
        assert!(!pointing_game(&[0.9, 0.9, 0.1, 0.3], &mask));
        assert!(!pointing_game(&[0.9, 0.2, 0.1], &mask));
        assert!(pointing_game(&[f32::NAN, 0.2, 0.5, 0.3], &[0, 0, 255, 0]));
    }

    #[test]
    fn pointing_game_within_counts_near_misses_only() {
        // A 5x7 map whose maximum is at (row 2, col 1); the object is the pixel (2, 4).
        let mut sal = vec![0.0f32; 35];
        sal[2 * 7 + 1] = 1.0;
        let mut mask = vec![0u8; 35];
        mask[2 * 7 + 4] = 255;
        assert!(!pointing_game(&sal, &mask));
        assert!(!pointing_game_within(&sal, &mask, 7, 0.0));
        assert!(!pointing_game_within(&sal, &mask, 7, 2.9));
        assert!(pointing_game_within(&sal, &mask, 7, 3.0));
        // Diagonal distance is Euclidean: (0, 0) to (2, 4) is sqrt(20) = 4.47.
        let mut corner = vec![0.0f32; 35];
        corner[0] = 1.0;
        assert!(!pointing_game_within(&corner, &mask, 7, 4.4));
        assert!(pointing_game_within(&corner, &mask, 7, 4.5));
        // Tolerance 0 is the strict game, ties included; bad shapes are misses.
        assert!(pointing_game_within(
            &[0.9, 0.2, 0.1, 0.9],
            &[0, 0, 0, 255],
            2,
            0.0
        ));
        assert!(!pointing_game_within(&sal, &mask, 6, 50.0));
        assert!(!pointing_game_within(&sal, &mask, 0, 50.0));
        assert!(!pointing_game_within(&[f32::NAN; 4], &[255; 4], 2, 50.0));
    }

    #[test]
    fn energy_pointing_game_on_hand_made_maps() {
        let mask = [0u8, 0, 1, 1];
        assert!((energy_pointing_game(&[1.0, 0.0, 2.0, 1.0], &mask) - 0.75).abs() < 1e-12);
        // Negative values carry no energy.
        assert!((energy_pointing_game(&[-5.0, 1.0, 3.0, -1.0], &mask) - 0.75).abs() < 1e-12);
        assert_eq!(energy_pointing_game(&[-1.0, 0.0, -2.0, 0.0], &mask), 0.0);
        assert_eq!(energy_pointing_game(&[1.0, 1.0, 1.0, 1.0], &[0; 4]), 0.0);
    }

    #[test]
    fn energy_pointing_game_minmax_ignores_an_offset() {
        let mask = [0u8, 0, 1, 1];
        // [1, 0, 2, 1] -> [0.5, 0, 1, 0.5]: 1.5 of 2 inside.
        let e = energy_pointing_game_minmax(&[1.0, 0.0, 2.0, 1.0], &mask);
        assert!((e - 0.75).abs() < 1e-12);
        // Adding 10 everywhere changes the raw score a lot and the normalised one not at all.
        let shifted = [11.0, 10.0, 12.0, 11.0];
        assert!((energy_pointing_game(&shifted, &mask) - 23.0 / 44.0).abs() < 1e-12);
        assert!((energy_pointing_game_minmax(&shifted, &mask) - 0.75).abs() < 1e-12);
        // Negative values are not lost: [-3, -1, 1, -1] -> [0, 0.5, 1, 0.5].
        let e = energy_pointing_game_minmax(&[-3.0, -1.0, 1.0, -1.0], &mask);
        assert!((e - 0.75).abs() < 1e-12);
        // NaN ignored; constant and mismatched maps score 0.
        let e = energy_pointing_game_minmax(&[f32::NAN, 0.0, 2.0, 1.0], &mask);
        assert!((e - 1.5 / 1.5).abs() < 1e-12);
        assert_eq!(energy_pointing_game_minmax(&[2.0; 4], &mask), 0.0);
        assert_eq!(energy_pointing_game_minmax(&[1.0, 2.0], &mask), 0.0);
    }

    #[test]
    fn background_baseline_needs_the_background() {
        let x = vec![0.5f32; 3 * 4 * 5];
        let bg: Vec<f32> = (0..x.len()).map(|i| i as f32).collect();
        let b = Baseline::parse("background", 0, 0.0).unwrap();
        assert_eq!(b, Baseline::Background);
        assert_eq!(b.apply_with(&x, (4, 5), Some(&bg)).unwrap(), bg);
        let err = b.apply(&x, (4, 5)).unwrap_err().to_string();
        assert!(err.contains("needs the image without its object"), "{err}");
        assert!(b.apply_with(&x, (4, 5), Some(&bg[1..])).is_err());
        assert_eq!(b.report_json()["kind"], "background");
        let err = Baseline::parse("mean", 11, 5.0).unwrap_err().to_string();
        assert!(err.contains("expected zero, blur or background"), "{err}");
        // Round trip through the run record's settings.
        let p = CurveParams {
            insertion_baseline: Baseline::Background,
            ..CurveParams::default()
        };
        let back: CurveParams = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn curves_with_the_background_baseline_run_between_image_and_background() {
        let m = model();
        let x = input(&m);
        let (h, w) = m.spec().input_size;
        // A stand-in "background": the image with its left half blurred away.
        let blurred = Baseline::RISE_BLUR.apply(&x, (h, w)).unwrap();
        let bg: Vec<f32> = (0..x.len())
            .map(|i| if i % w < w / 2 { blurred[i] } else { x[i] })
            .collect();
        let class = 2;
        let p = CurveParams {
            step: 224 * 56,
            deletion_baseline: Baseline::Background,
            insertion_baseline: Baseline::Background,
            batch: 8,
        };
        let sal = ramp((h, w));
        let ins = insertion_with(&m, &x, Some(&bg), &sal, class, &p).unwrap();
        assert!((ins.probs[0] - prob(&m, &bg, class)).abs() < 1e-5);
        assert!((ins.probs[ins.probs.len() - 1] - prob(&m, &x, class)).abs() < 1e-5);
        let del = deletion_with(&m, &x, Some(&bg), &sal, class, &p).unwrap();
        assert!((del.probs[0] - prob(&m, &x, class)).abs() < 1e-5);
        assert!((del.probs[del.probs.len() - 1] - prob(&m, &bg, class)).abs() < 1e-5);
        assert!((prob(&m, &bg, class) - prob(&m, &x, class)).abs() > 1e-4);
        // Without the background, the baseline says why it cannot run.
        assert!(insertion(&m, &x, &sal, class, &p).is_err());
    }

    #[test]
    fn share_interval_is_wilson_and_stays_in_the_unit_range() {
        // 3 of 3: Wilson [0.4385, 1]; 8 of 10: [0.4902, 0.9433] (standard tables).
        let s = summarize_share(&[1.0, 1.0, 1.0]);
        assert_eq!(s.mean, 1.0);
        assert!(
            (s.ci95[0] - 0.4385).abs() < 1e-4 && s.ci95[1] == 1.0,
            "{s:?}"
        );
        let v: Vec<f64> = (0..10).map(|i| if i < 8 { 1.0 } else { 0.0 }).collect();
        let s = summarize_share(&v);
        assert!((s.mean - 0.8).abs() < 1e-12);
        assert!((s.ci95[0] - 0.4902).abs() < 1e-4, "{s:?}");
        assert!((s.ci95[1] - 0.9433).abs() < 1e-4, "{s:?}");
        assert!(summarize_share(&[]).mean.is_nan());
    }

    #[test]
    fn summarize_known_values() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(s.n, 5);
        assert!((s.mean - 3.0).abs() < 1e-12);
        // s = sqrt(2.5), t(4) = 2.776: half width 2.776 * sqrt(2.5 / 5) = 1.96293.
        assert!((s.ci95[1] - 3.0 - 2.776 * 0.5f64.sqrt()).abs() < 1e-9);
        assert!((s.ci95[0] - 3.0 + 2.776 * 0.5f64.sqrt()).abs() < 1e-9);
        let one = summarize(&[0.4]);
        assert_eq!(one.ci95, [0.4, 0.4]);
        assert!(summarize(&[]).mean.is_nan());
        let same = summarize(&[0.5; 100]);
        assert_eq!(same.ci95, [0.5, 0.5]);
        // Large df approaches the normal quantile; t(60) = 2.000.
        assert!((t975(60) - 2.000).abs() < 1e-3);
        assert!((t975(1000) - 1.962).abs() < 1e-3);
    }
}
