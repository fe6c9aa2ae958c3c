//! A seeded benchmark with ground truth: images of one shape on clutter, where the class is the
//! shape, with the object's mask and bounding box.
//!
//! An explanation of a model that classifies these images should point at the object, and the
//! mask says exactly where it is, so saliency can be scored against it (e.g. by `vitcx eval`).
//! Sample `i` of seed `s` comes from its own ChaCha8 stream (`seed_from_u64(s)`, stream `i`), so
//! samples are independent of one another and the same seed gives byte-identical files.
//!
//! What carries the class: only the silhouette. Position, scale, rotation and colour are drawn
//! independently of the class; the fill colour is redrawn (never per class) until it stands out
//! from the background under it, and half the objects get a darker or lighter outline. The
//! clutter (gradient, coarse colour patches, stripes, blobs of radius <= 6 px, strokes <= 16 px
//! long, pixel noise) has no shape at object scale (>= 35% of the image side).
//!
//! Paper context: Xie et al., "ViT-CX: Causal Explanation of Vision Transformers", IJCAI 2023,
//! <https://arxiv.org/abs/2211.03064> (the paper scores explanations by deletion/insertion; a
//! known object mask allows pointing-game and mask-overlap checks as well).

use std::f32::consts::{FRAC_1_SQRT_2, PI, TAU};
use std::path::Path;

use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};

/// The object classes, index = class id.
pub const CLASSES: [&str; 6] = ["circle", "square", "triangle", "star", "cross", "ring"];

/// The benchmark's image size `(H, W)`, used by [`write_dataset`].
pub const DEFAULT_SIZE: (u32, u32) = (224, 224);

/// What a scene is drawn from, beyond the seed: the object's size and the clutter's strength.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    /// The object's circumscribed diameter as a fraction of the shorter image side, uniform in
    /// `[lo, hi]`; the object's centre is then uniform over the places that keep it whole.
    pub diameter: (f32, f32),
    /// Background clutter in [0, 1]: 1 is the benchmark, 0 leaves only the smooth colour
    /// gradient behind the object (curriculum training, ablations).
    pub clutter: f32,
}

impl Scene {
    /// The benchmark: objects of 35-45% of the side, on full clutter. Small enough that their
    /// centres spread over the image (up to a third of the side from its centre on each axis):
    /// with the training sizes, never far from the middle, a centred blob scored as well as any
    /// explanation on insertion from the object-free image (README, "The demo benchmark").
    pub const BENCHMARK: Scene = Scene {
        diameter: (0.35, 0.45),
        clutter: 1.0,
    };

    /// What the demo model trains on: objects of 35-70% of the side (bounding box roughly
    /// 30-70%, by shape and rotation), the benchmark's sizes included. (Until vitcx 0.2:
    /// 0.16-0.45; objects of 2-3 patches left a small ViT needing over a million images to
    /// learn the classes; see the README's demo model section.)
    pub const TRAINING: Scene = Scene {
        diameter: (0.35, 0.70),
        clutter: 1.0,
    };

    /// This scene with `clutter`.
    pub fn with_clutter(self, clutter: f32) -> Scene {
        Scene { clutter, ..self }
    }

    /// Checks the parameters a user gives: clutter in [0, 1], `0 < lo <= hi <= 0.9` (an
    /// object must fit whole, with room to move).
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.clutter) {
            return Err(Error::invalid(format!(
                "clutter {} out of range; expected a value in [0, 1]",
                self.clutter
            )));
        }
        let (lo, hi) = self.diameter;
        if !(lo > 0.0 && lo <= hi && hi <= MAX_DIAMETER) {
            return Err(Error::invalid(format!(
                "object size {lo}-{hi} out of range; expected LO-HI with 0 < LO <= HI <= \
                 {MAX_DIAMETER} (fractions of the image side)"
            )));
        }
        Ok(())
    }
}

/// The largest object diameter [`Scene::validate`] accepts, as a fraction of the side.
pub const MAX_DIAMETER: f32 = 0.9;

/// One generated sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The picture, `(H, W)` RGB.
    pub image: RgbImage,
    /// Index into [`CLASSES`].
    pub class_id: usize,
    /// Tight box around the mask: `[x0, y0, x1, y1]`, `x1`/`y1` exclusive.
    pub bbox: [u32; 4],
    /// 255 where the object covers at least half the pixel, 0 elsewhere; `(H, W)`.
    pub mask: GrayImage,
}

/// Sample `index` of the benchmark ([`Scene::BENCHMARK`]) with `seed`, of size `(H, W)`
/// ([`DEFAULT_SIZE`] for the benchmark). Deterministic and independent of other indices (one RNG
/// stream per index).
///
/// Any size works; on images smaller than about 16 px the object may be too small to cover a
/// pixel centre, and then the mask is empty and `bbox` is `[0, 0, 0, 0]`.
pub fn sample(seed: u64, index: u64, size: (u32, u32)) -> Sample {
    sample_in(&Scene::BENCHMARK, seed, index, size)
}

/// [`sample`] drawn from `scene` (e.g. [`Scene::TRAINING`], or a curriculum's lighter clutter).
/// Out-of-range parameters are clamped (clutter to [0, 1], NaN to 1; sizes to what fits).
pub fn sample_in(scene: &Scene, seed: u64, index: u64, size: (u32, u32)) -> Sample {
    render(scene, seed, index, size, false).0
}

/// [`sample_in`] and the same scene rendered without the object: the same background, clutter
/// and pixel noise (the same random draws), so the two images differ only where the object
/// covers part of a pixel (within about a pixel of its mask). Deletion towards this image, or
/// insertion from it, measures a map against the true absence of the object. The sample is
/// identical to [`sample_in`]'s.
pub fn sample_with_background(
    scene: &Scene,
    seed: u64,
    index: u64,
    size: (u32, u32),
) -> (Sample, RgbImage) {
    let (s, background) = render(scene, seed, index, size, true);
    let background = background.unwrap_or_else(|| RgbImage::new(size.1, size.0));
    (s, background)
}

/// One sample, and with `with_background` the object-free image. The random stream is consumed
/// in the same order either way, so the sample does not depend on `with_background`.
fn render(
    scene: &Scene,
    seed: u64,
    index: u64,
    size: (u32, u32),
    with_background: bool,
) -> (Sample, Option<RgbImage>) {
    let clutter = if scene.clutter.is_finite() {
        scene.clutter.clamp(0.0, 1.0)
    } else {
        1.0
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let (h, w) = size;
    let class_id = rng.random_range(0..CLASSES.len());
    let mut canvas = Canvas::new(w as usize, h as usize);
    background(&mut canvas, &mut rng, clutter);
    let object = Object::random(class_id, w as f32, h as f32, scene.diameter, &mut rng);
    let mut empty = with_background.then(|| Canvas {
        w: canvas.w,
        h: canvas.h,
        px: canvas.px.clone(),
    });
    let mask = object.composite(&mut canvas, &mut rng);
    if let Some(empty) = empty.as_mut() {
        // The noise the image gets next, drawn from a copy of the stream at the same point.
        add_noise(empty, &mut rng.clone(), clutter);
    }
    add_noise(&mut canvas, &mut rng, clutter);
    let bbox = bounding_box(&mask);
    let sample = Sample {
        image: canvas.to_image(),
        class_id,
        bbox,
        mask,
    };
    (sample, empty.map(|c| c.to_image()))
}

/// One manifest line, parsed (for `vitcx eval`). Paths are relative to the manifest's directory.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    /// The image file, relative to the manifest.
    pub image: String,
    /// Index into the class list ([`CLASSES`] for synthetic data).
    pub class_id: usize,
    /// Name of the class, for people reading the manifest.
    pub class_name: String,
    /// `[x0, y0, x1, y1]` of the object, `x1`/`y1` exclusive.
    pub bbox: [u32; 4],
    /// The object mask (255 inside, 0 outside), relative to the manifest; optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// The same scene without the object ([`sample_with_background`]), relative to the
    /// manifest; optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<String>,
}

/// The most samples one `synth` run writes (about 30 GB of PNG).
pub const MAX_COUNT: usize = 1_000_000;

/// Writes `count` samples of [`DEFAULT_SIZE`] to `dir` (created if missing): `NNNNN.png`,
/// `NNNNN.mask.png`, `NNNNN.background.png` (the scene without the object, see
/// [`sample_with_background`]) and `manifest.jsonl` (one [`ManifestEntry`] as JSON per line,
/// paths relative to the manifest), drawn from `scene` ([`Scene::BENCHMARK`] for the
/// benchmark). Every file is written atomically; the manifest comes last, so a complete
/// manifest means a complete dataset. `progress` gets the number of samples written so far.
///
/// Errors: [`Error::InvalidArgument`] for `count == 0` or a scene out of range
/// ([`Scene::validate`]); [`Error::Io`] naming the path when the directory cannot be created or
/// a file cannot be written.
pub fn write_dataset(
    dir: &Path,
    count: usize,
    seed: u64,
    scene: &Scene,
    progress: &mut dyn FnMut(usize),
) -> Result<()> {
    if count == 0 || count > MAX_COUNT {
        return Err(Error::invalid(format!(
            "count {count} out of range; expected 1 to {MAX_COUNT} samples"
        )));
    }
    scene.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // The whole dataset is one set: on a failure (a full disk) or a signal nothing of this run
    // stays, and a manifest never names an image that is missing.
    let mut set = crate::io::output::OutputSet::new();
    let mut manifest = String::new();
    for i in 0..count {
        let (s, empty) = sample_with_background(scene, seed, i as u64, DEFAULT_SIZE);
        let image = format!("{i:05}.png");
        let mask = format!("{i:05}.mask.png");
        let background = format!("{i:05}.background.png");
        set.add_png(&dir.join(&image), &s.image)?;
        set.add_gray_png(&dir.join(&mask), &s.mask)?;
        set.add_png(&dir.join(&background), &empty)?;
        let entry = ManifestEntry {
            image,
            class_id: s.class_id,
            class_name: CLASSES[s.class_id].to_string(),
            bbox: s.bbox,
            mask: Some(mask),
            background: Some(background),
        };
        let line = serde_json::to_string(&entry)
            .map_err(|e| Error::invalid(format!("cannot encode manifest entry {i}: {e}")))?;
        manifest.push_str(&line);
        manifest.push('\n');
        progress(i + 1);
    }
    set.add(&dir.join("manifest.jsonl"), manifest.as_bytes())?;
    set.commit()
}

/// Reads a `manifest.jsonl` (one [`ManifestEntry`] per line; blank lines are skipped). The
/// caller resolves image and mask paths against the manifest's directory. An empty manifest
/// gives an empty list.
///
/// Errors: [`Error::Io`] when the file cannot be read; [`Error::InvalidArgument`] naming the
/// manifest and the 1-based line number when a line is not a valid entry.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(line).map_err(|e| {
            Error::invalid(format!(
                "manifest {} line {}: {e}; expected a JSON object with image, class_id, \
                 class_name, bbox and optionally mask and background",
                path.display(),
                n + 1
            ))
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

/// Tight box of the nonzero mask pixels, `[x0, y0, x1, y1]` exclusive; zeros when empty.
fn bounding_box(mask: &GrayImage) -> [u32; 4] {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] > 0 {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        }
    }
    if x1 == 0 {
        [0, 0, 0, 0]
    } else {
        [x0, y0, x1, y1]
    }
}

/// Uniform in `[lo, hi)`; never panics (an empty range gives `lo`).
fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo).max(0.0) * rng.random::<f32>()
}

fn random_colour(rng: &mut ChaCha8Rng) -> [f32; 3] {
    [
        uniform(rng, 0.0, 255.0),
        uniform(rng, 0.0, 255.0),
        uniform(rng, 0.0, 255.0),
    ]
}

fn lerp3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn dist3(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// Float RGB pixels in [0, 255], row-major `(H, W)`.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[f32; 3]>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: vec![[0.0; 3]; w * h],
        }
    }

    /// The pixels rounded to 8 bits.
    fn to_image(&self) -> RgbImage {
        RgbImage::from_fn(self.w as u32, self.h as u32, |x, y| {
            let p = self.px[y as usize * self.w + x as usize];
            image::Rgb(p.map(|v| v.round().clamp(0.0, 255.0) as u8))
        })
    }

    /// Blends `colour` with per-pixel opacity `alpha(x, y)` (pixel centres) over the pixels of
    /// the box `[x0, x1) x [y0, y1)` (clipped to the canvas).
    fn blend_box(
        &mut self,
        (x0, y0, x1, y1): (f32, f32, f32, f32),
        colour: [f32; 3],
        alpha: impl Fn(f32, f32) -> f32,
    ) {
        let xa = x0.floor().max(0.0) as usize;
        let ya = y0.floor().max(0.0) as usize;
        let xb = (x1.ceil().max(0.0) as usize).min(self.w);
        let yb = (y1.ceil().max(0.0) as usize).min(self.h);
        for y in ya..yb {
            for x in xa..xb {
                let a = alpha(x as f32 + 0.5, y as f32 + 0.5);
                if a > 0.0 {
                    let p = &mut self.px[y * self.w + x];
                    *p = lerp3(*p, colour, a.min(1.0));
                }
            }
        }
    }
}

/// Gradient, coarse colour patches, stripes, small blobs and short strokes.
fn background(c: &mut Canvas, rng: &mut ChaCha8Rng, clutter: f32) {
    let (wf, hf) = (c.w as f32, c.h as f32);
    let diag = (wf * wf + hf * hf).sqrt().max(1.0);

    // Linear gradient between two colours at a random angle.
    let (c0, c1) = (random_colour(rng), random_colour(rng));
    let a = uniform(rng, 0.0, TAU);
    let (ca, sa) = (a.cos(), a.sin());
    for y in 0..c.h {
        for x in 0..c.w {
            let t = ((x as f32 - wf / 2.0) * ca + (y as f32 - hf / 2.0) * sa) / diag + 0.5;
            c.px[y * c.w + x] = lerp3(c0, c1, t.clamp(0.0, 1.0));
        }
    }

    // Coarse value noise: random colours on a g x g grid, smoothly interpolated (soft patches
    // wider than any object, no edges).
    let g = rng.random_range(2..=4usize);
    let nodes: Vec<[f32; 3]> = (0..(g + 1) * (g + 1)).map(|_| random_colour(rng)).collect();
    let alpha = uniform(rng, 0.15, 0.45) * clutter;
    let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
    for y in 0..c.h {
        let gy = (y as f32 + 0.5) / hf * g as f32;
        let iy = (gy as usize).min(g - 1);
        let ty = smooth((gy - iy as f32).clamp(0.0, 1.0));
        for x in 0..c.w {
            let gx = (x as f32 + 0.5) / wf * g as f32;
            let ix = (gx as usize).min(g - 1);
            let tx = smooth((gx - ix as f32).clamp(0.0, 1.0));
            let n = |i: usize, j: usize| nodes[j * (g + 1) + i];
            let top = lerp3(n(ix, iy), n(ix + 1, iy), tx);
            let bottom = lerp3(n(ix, iy + 1), n(ix + 1, iy + 1), tx);
            let p = &mut c.px[y * c.w + x];
            *p = lerp3(*p, lerp3(top, bottom, ty), alpha);
        }
    }

    // One or two layers of sinusoidal stripes.
    for _ in 0..rng.random_range(1..=2) {
        let colour = random_colour(rng);
        let a = uniform(rng, 0.0, PI);
        let (ca, sa) = (a.cos(), a.sin());
        let period = uniform(rng, 5.0, 36.0);
        let phase = uniform(rng, 0.0, TAU);
        let strength = uniform(rng, 0.1, 0.35) * clutter;
        let sharp = rng.random_bool(0.5);
        c.blend_box((0.0, 0.0, wf, hf), colour, |x, y| {
            let s = 0.5 + 0.5 * ((x * ca + y * sa) * TAU / period + phase).sin();
            strength * if sharp { s * s * s } else { s }
        });
    }

    // Small blobs of every colour: soft Gaussian spots, discs and ellipses, radius <= 6 px.
    let n_blobs = rng.random_range(20..=60usize);
    let n_blobs = (n_blobs as f32 * clutter).round() as usize;
    for _ in 0..n_blobs {
        let colour = random_colour(rng);
        let (cx, cy) = (uniform(rng, 0.0, wf), uniform(rng, 0.0, hf));
        let r = uniform(rng, 1.5, 6.0);
        let opacity = uniform(rng, 0.5, 1.0);
        let bbox = (cx - 2.0 * r, cy - 2.0 * r, cx + 2.0 * r, cy + 2.0 * r);
        match rng.random_range(0..3) {
            0 => c.blend_box(bbox, colour, |x, y| {
                let d2 = (x - cx).powi(2) + (y - cy).powi(2);
                opacity * (-d2 / (0.5 * r * r)).exp()
            }),
            1 => c.blend_box(bbox, colour, |x, y| {
                let d = ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() - r;
                opacity * (0.5 - d).clamp(0.0, 1.0)
            }),
            _ => {
                let a = uniform(rng, 0.0, PI);
                let (ca, sa) = (a.cos(), a.sin());
                let rb = r / uniform(rng, 1.5, 3.0);
                c.blend_box(bbox, colour, |x, y| {
                    let (dx, dy) = (x - cx, y - cy);
                    let (u, v) = ((dx * ca + dy * sa) / r, (-dx * sa + dy * ca) / rb);
                    // Approximate pixel distance to the ellipse edge, for anti-aliasing.
                    let d = ((u * u + v * v).sqrt() - 1.0) * rb;
                    opacity * (0.5 - d).clamp(0.0, 1.0)
                });
            }
        }
    }

    // Short strokes (4-16 px), too short to form an object-sized cross or star.
    let n_strokes = rng.random_range(4..=16usize);
    let n_strokes = (n_strokes as f32 * clutter).round() as usize;
    for _ in 0..n_strokes {
        let colour = random_colour(rng);
        let (x0, y0) = (uniform(rng, 0.0, wf), uniform(rng, 0.0, hf));
        let a = uniform(rng, 0.0, TAU);
        let len = uniform(rng, 4.0, 16.0);
        let (x1, y1) = (x0 + len * a.cos(), y0 + len * a.sin());
        let half = uniform(rng, 0.5, 1.2);
        let bbox = (
            x0.min(x1) - 2.0,
            y0.min(y1) - 2.0,
            x0.max(x1) + 2.0,
            y0.max(y1) + 2.0,
        );
        c.blend_box(bbox, colour, |x, y| {
            let d = segment_distance(x, y, (x0, y0), (x1, y1)) - half;
            (0.5 - d).clamp(0.0, 1.0)
        });
    }
}

/// Gaussian pixel noise, independent per channel, with a random standard deviation.
fn add_noise(c: &mut Canvas, rng: &mut ChaCha8Rng, clutter: f32) {
    let sigma = uniform(rng, 2.0, 10.0) * clutter.max(0.2);
    // Invariant: sigma is finite and positive, so Normal::new cannot fail; fall back to no
    // noise rather than panic all the same.
    let Ok(normal) = Normal::new(0.0f32, sigma) else {
        return;
    };
    for p in &mut c.px {
        for v in p.iter_mut() {
            *v += normal.sample(rng);
        }
    }
}

fn segment_distance(px: f32, py: f32, a: (f32, f32), b: (f32, f32)) -> f32 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((px - a.0) * dx + (py - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    ((px - a.0 - t * dx).powi(2) + (py - a.1 - t * dy).powi(2)).sqrt()
}

/// Signed distance to a polygon's edge (negative inside, even-odd rule), in polygon units.
fn polygon_sdf(x: f32, y: f32, vertices: &[(f32, f32)]) -> f32 {
    let mut d = f32::INFINITY;
    let mut inside = false;
    let n = vertices.len();
    for i in 0..n {
        let a = vertices[i];
        let b = vertices[(i + 1) % n];
        d = d.min(segment_distance(x, y, a, b));
        if (a.1 > y) != (b.1 > y) && x < a.0 + (y - a.1) / (b.1 - a.1) * (b.0 - a.0) {
            inside = !inside;
        }
    }
    if inside {
        -d
    } else {
        d
    }
}

/// The silhouette of a class in local units: it fits the unit circle (circumradius 1).
enum Shape {
    Circle,
    Ring { inner: f32 },
    Polygon(Vec<(f32, f32)>),
}

impl Shape {
    fn of_class(class_id: usize) -> Self {
        let polar = |k: usize, n: usize, r: f32| {
            let a = PI / 2.0 + TAU * k as f32 / n as f32;
            (r * a.cos(), r * a.sin())
        };
        match class_id {
            0 => Shape::Circle,
            1 => {
                let s = FRAC_1_SQRT_2;
                Shape::Polygon(vec![(-s, -s), (s, -s), (s, s), (-s, s)])
            }
            2 => Shape::Polygon((0..3).map(|k| polar(k, 3, 1.0)).collect()),
            3 => Shape::Polygon(
                (0..10)
                    .map(|k| polar(k, 10, if k % 2 == 0 { 1.0 } else { 0.42 }))
                    .collect(),
            ),
            4 => {
                // Arms of half-width w reaching l: corners at radius sqrt(l^2 + w^2) < 1.
                let (w, l) = (0.28, 0.95);
                Shape::Polygon(vec![
                    (-w, -l),
                    (w, -l),
                    (w, -w),
                    (l, -w),
                    (l, w),
                    (w, w),
                    (w, l),
                    (-w, l),
                    (-w, w),
                    (-l, w),
                    (-l, -w),
                    (-w, -w),
                ])
            }
            _ => Shape::Ring { inner: 0.55 },
        }
    }

    fn sdf(&self, x: f32, y: f32) -> f32 {
        match self {
            Shape::Circle => (x * x + y * y).sqrt() - 1.0,
            Shape::Ring { inner } => {
                let (mid, half) = ((1.0 + inner) / 2.0, (1.0 - inner) / 2.0);
                ((x * x + y * y).sqrt() - mid).abs() - half
            }
            Shape::Polygon(v) => polygon_sdf(x, y, v),
        }
    }
}

/// The object: shape, placement and look, all drawn independently of the class except the shape.
struct Object {
    shape: Shape,
    cx: f32,
    cy: f32,
    /// Circumradius in pixels.
    radius: f32,
    cos: f32,
    sin: f32,
}

impl Object {
    fn random(class_id: usize, w: f32, h: f32, diameter: (f32, f32), rng: &mut ChaCha8Rng) -> Self {
        let side = w.min(h);
        let clamp = |d: f32| {
            if d.is_finite() {
                d.clamp(0.0, MAX_DIAMETER)
            } else {
                0.5
            }
        };
        let (lo, hi) = (clamp(diameter.0), clamp(diameter.1));
        let radius = uniform(rng, lo, hi.max(lo)) * side / 2.0;
        // Keep the whole circumscribed circle (plus 1 px) inside the image.
        let m = radius + 1.0;
        let cx = uniform(rng, m, w - m).clamp(0.0, w.max(0.0));
        let cy = uniform(rng, m, h - m).clamp(0.0, h.max(0.0));
        let angle = uniform(rng, 0.0, TAU);
        Self {
            shape: Shape::of_class(class_id),
            cx,
            cy,
            radius,
            cos: angle.cos(),
            sin: angle.sin(),
        }
    }

    /// Signed distance in pixels from the pixel-centre point `(x, y)` to the object's edge.
    fn sdf_px(&self, x: f32, y: f32) -> f32 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let u = (dx * self.cos + dy * self.sin) / self.radius;
        let v = (-dx * self.sin + dy * self.cos) / self.radius;
        self.shape.sdf(u, v) * self.radius
    }

    /// Picks a colour that stands out from the background under the object, draws the object
    /// anti-aliased (coverage from the signed distance), and returns its mask.
    fn composite(&self, c: &mut Canvas, rng: &mut ChaCha8Rng) -> GrayImage {
        let mut mask = GrayImage::new(c.w as u32, c.h as u32);
        let r = self.radius + 2.0;
        let xa = (self.cx - r).floor().max(0.0) as usize;
        let ya = (self.cy - r).floor().max(0.0) as usize;
        let xb = ((self.cx + r).ceil().max(0.0) as usize).min(c.w);
        let yb = ((self.cy + r).ceil().max(0.0) as usize).min(c.h);
        let bw = xb.saturating_sub(xa);
        let mut dist = vec![0.0f32; bw * yb.saturating_sub(ya)];
        let (mut sum, mut n) = ([0.0f32; 3], 0.0f32);
        for y in ya..yb {
            for x in xa..xb {
                let d = self.sdf_px(x as f32 + 0.5, y as f32 + 0.5);
                dist[(y - ya) * bw + x - xa] = d;
                if d <= 0.0 {
                    let p = c.px[y * c.w + x];
                    for k in 0..3 {
                        sum[k] += p[k];
                    }
                    n += 1.0;
                }
            }
        }
        let under = sum.map(|s| s / n.max(1.0));

        // Any colour, redrawn until it differs enough from the mean background under the object
        // (the background is independent of the class, so the colour stays class-free).
        let mut fill = random_colour(rng);
        for _ in 0..32 {
            if dist3(fill, under) >= 120.0 {
                break;
            }
            let candidate = random_colour(rng);
            if dist3(candidate, under) > dist3(fill, under) {
                fill = candidate;
            }
        }
        // Mild shading along a random direction, and an optional darker/lighter outline.
        let a = uniform(rng, 0.0, TAU);
        let (sx, sy) = (a.cos(), a.sin());
        let shade = uniform(rng, 0.0, 0.15);
        let outline = rng.random_bool(0.5).then(|| {
            let luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2];
            let target = if luma > 110.0 { 0.0 } else { 255.0 };
            let colour = lerp3(fill, [target; 3], 0.7);
            (colour, uniform(rng, 1.5, 3.0))
        });

        for y in ya..yb {
            for x in xa..xb {
                let d = dist[(y - ya) * bw + x - xa];
                let coverage = (0.5 - d).clamp(0.0, 1.0);
                if coverage <= 0.0 {
                    continue;
                }
                let t = ((x as f32 - self.cx) * sx + (y as f32 - self.cy) * sy) / self.radius;
                let gain = 1.0 + shade * t.clamp(-1.0, 1.0);
                let mut colour = fill.map(|v| (v * gain).clamp(0.0, 255.0));
                if let Some((line, width)) = outline {
                    colour = lerp3(colour, line, (d + width + 0.5).clamp(0.0, 1.0));
                }
                let p = &mut c.px[y * c.w + x];
                *p = lerp3(*p, colour, coverage);
                if d <= 0.0 {
                    mask.put_pixel(x as u32, y as u32, image::Luma([255]));
                }
            }
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(mask: &GrayImage) -> f64 {
        let on = mask.pixels().filter(|p| p[0] == 255).count();
        on as f64 / (mask.width() * mask.height()) as f64
    }

    #[test]
    fn same_seed_and_index_give_identical_pixels() {
        let a = sample(7, 3, DEFAULT_SIZE);
        let b = sample(7, 3, DEFAULT_SIZE);
        assert_eq!(a.image.as_raw(), b.image.as_raw());
        assert_eq!(a.mask.as_raw(), b.mask.as_raw());
        assert_eq!((a.class_id, a.bbox), (b.class_id, b.bbox));
        assert_ne!(a.image.as_raw(), sample(8, 3, DEFAULT_SIZE).image.as_raw());
        assert_ne!(a.image.as_raw(), sample(7, 4, DEFAULT_SIZE).image.as_raw());
        // Stream per index: sample 3 does not depend on having generated 0..3 first.
        let _ = sample(7, 0, DEFAULT_SIZE);
        assert_eq!(a.image.as_raw(), sample(7, 3, DEFAULT_SIZE).image.as_raw());
    }

    #[test]
    fn background_is_the_scene_without_the_object() {
        for (i, clutter) in (0..24).zip([1.0, 0.3, 0.0].iter().cycle()) {
            let scene = [Scene::BENCHMARK, Scene::TRAINING][i as usize % 2].with_clutter(*clutter);
            let (s, bg) = sample_with_background(&scene, 13, i, DEFAULT_SIZE);
            // The sample does not depend on whether its background is rendered.
            let plain = sample_in(&scene, 13, i, DEFAULT_SIZE);
            assert_eq!(s.image.as_raw(), plain.image.as_raw(), "sample {i}");
            assert_eq!(s.mask.as_raw(), plain.mask.as_raw(), "sample {i}");
            assert_eq!(bg.dimensions(), s.image.dimensions());
            // Identical pixels away from the object: anti-aliasing reaches half a pixel past
            // the mask, so everything more than 2 px outside the mask's box is the same byte.
            let [x0, y0, x1, y1] = s.bbox;
            let near = |x: u32, y: u32| x + 2 >= x0 && x < x1 + 2 && y + 2 >= y0 && y < y1 + 2;
            let mut same_inside_box = 0usize;
            for (x, y, p) in s.image.enumerate_pixels() {
                if !near(x, y) {
                    assert_eq!(p, bg.get_pixel(x, y), "sample {i}: pixel ({x}, {y})");
                } else if p == bg.get_pixel(x, y) {
                    same_inside_box += 1;
                }
            }
            // Outside the mask but inside the box (a star's or cross's corners) it is the same
            // picture too; and the object is gone: inside the mask the two differ clearly.
            assert!(same_inside_box > 0, "sample {i}");
            let (mut diff, mut n) = (0f64, 0usize);
            for (x, y, m) in s.mask.enumerate_pixels() {
                if m[0] == 255 {
                    let (p, q) = (s.image.get_pixel(x, y).0, bg.get_pixel(x, y).0);
                    diff += dist3(p.map(f32::from), q.map(f32::from)) as f64;
                    n += 1;
                }
            }
            assert!(
                diff / n as f64 > 20.0,
                "sample {i}: mean difference {}",
                diff / n as f64
            );
        }
    }

    #[test]
    fn image_and_mask_have_the_requested_size() {
        let s = sample(1, 0, (120, 200));
        assert_eq!(s.image.dimensions(), (200, 120));
        assert_eq!(s.mask.dimensions(), (200, 120));
        assert!(s.bbox[2] <= 200 && s.bbox[3] <= 120);
        // Degenerate sizes do not panic.
        for size in [(0, 0), (1, 1), (3, 50)] {
            let s = sample(1, 0, size);
            assert_eq!(s.image.dimensions(), (size.1, size.0));
        }
    }

    #[test]
    fn mask_is_plausible_and_bbox_is_tight() {
        for i in 0..120 {
            let s = sample(11, i, DEFAULT_SIZE);
            let f = share(&s.mask);
            // Smallest object: a star of circumdiameter 35% of 224 px (3.8%); largest: a
            // circle of 70% (38.5%).
            assert!((0.035..0.4).contains(&f), "sample {i}: mask share {f}");
            assert!(s.mask.pixels().all(|p| p[0] == 0 || p[0] == 255));
            let [x0, y0, x1, y1] = s.bbox;
            assert!(x0 < x1 && y0 < y1 && x1 <= 224 && y1 <= 224, "{:?}", s.bbox);
            // Fully inside with a margin: the object never touches the image border.
            assert!(x0 > 0 && y0 > 0 && x1 < 224 && y1 < 224, "{:?}", s.bbox);
            let longest = (x1 - x0).max(y1 - y0) as f64 / 224.0;
            assert!(
                (0.27..=0.71).contains(&longest),
                "sample {i}: size {longest}"
            );
            for (x, y, p) in s.mask.enumerate_pixels() {
                let inside = (x0..x1).contains(&x) && (y0..y1).contains(&y);
                assert!(
                    p[0] == 0 || inside,
                    "sample {i}: mask pixel ({x}, {y}) outside bbox"
                );
            }
            // Tight: every edge of the box touches the mask.
            let on = |x: u32, y: u32| s.mask.get_pixel(x, y)[0] == 255;
            assert!((y0..y1).any(|y| on(x0, y)) && (y0..y1).any(|y| on(x1 - 1, y)));
            assert!((x0..x1).any(|x| on(x, y0)) && (x0..x1).any(|x| on(x, y1 - 1)));
        }
    }

    #[test]
    fn object_stands_out_from_its_surroundings() {
        // Mean colour inside the mask vs. a 4 px band just outside it.
        let mut total = 0.0;
        let count = 60;
        for i in 0..count {
            let s = sample(5, i, DEFAULT_SIZE);
            let [x0, y0, x1, y1] = s.bbox;
            let (mut inside, mut outside) = (([0.0f64; 3], 0.0), ([0.0f64; 3], 0.0));
            for y in y0.saturating_sub(4)..(y1 + 4).min(224) {
                for x in x0.saturating_sub(4)..(x1 + 4).min(224) {
                    let p = s.image.get_pixel(x, y);
                    let near = (-4i32..=4).any(|dy| {
                        (-4i32..=4).any(|dx| {
                            let (xx, yy) = (x as i32 + dx, y as i32 + dy);
                            (0..224).contains(&xx)
                                && (0..224).contains(&yy)
                                && s.mask.get_pixel(xx as u32, yy as u32)[0] == 255
                        })
                    });
                    let acc = if s.mask.get_pixel(x, y)[0] == 255 {
                        &mut inside
                    } else if near {
                        &mut outside
                    } else {
                        continue;
                    };
                    for k in 0..3 {
                        acc.0[k] += p[k] as f64;
                    }
                    acc.1 += 1.0;
                }
            }
            let d: f64 = (0..3)
                .map(|k| (inside.0[k] / inside.1 - outside.0[k] / outside.1).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(d > 20.0, "sample {i}: object/surround colour distance {d}");
            total += d;
        }
        assert!(
            total / count as f64 > 60.0,
            "mean distance {}",
            total / count as f64
        );
    }

    #[test]
    fn classes_are_balanced() {
        let mut counts = [0usize; 6];
        for i in 0..600 {
            counts[sample(3, i, (64, 64)).class_id] += 1;
        }
        assert!(
            counts.iter().all(|&c| (60..=140).contains(&c)),
            "{counts:?}"
        );
    }

    /// Hue in radians and saturation of an RGB colour.
    fn hue_sat(p: [f64; 3]) -> (f64, f64) {
        let (r, g, b) = (p[0] / 255.0, p[1] / 255.0, p[2] / 255.0);
        let (max, min) = (r.max(g).max(b), r.min(g).min(b));
        let c = max - min;
        if c <= 1e-9 {
            return (0.0, 0.0);
        }
        let h = if max == r {
            ((g - b) / c).rem_euclid(6.0)
        } else if max == g {
            (b - r) / c + 2.0
        } else {
            (r - g) / c + 4.0
        };
        (h * std::f64::consts::PI / 3.0, c / max)
    }

    #[test]
    fn colour_and_position_carry_no_class_information() {
        // Per class: circular mean of the object's hue (a resultant near 0 means no preferred
        // hue), mean RGB, and mean bbox centre, each compared with all classes together.
        let n = 600;
        let mut hue = [[0.0f64; 3]; 6]; // cos, sin, count
        let mut rgb = [[0.0f64; 4]; 6]; // r, g, b, count
        let mut centre = [[0.0f64; 2]; 6];
        for i in 0..n {
            let s = sample(21, i, (96, 96));
            let (mut sum, mut k) = ([0.0f64; 3], 0.0);
            for (x, y, m) in s.mask.enumerate_pixels() {
                if m[0] == 255 {
                    let p = s.image.get_pixel(x, y);
                    for c in 0..3 {
                        sum[c] += p[c] as f64;
                    }
                    k += 1.0;
                }
            }
            let mean = sum.map(|v| v / k);
            let (h, sat) = hue_sat(mean);
            let c = s.class_id;
            hue[c][0] += sat * h.cos();
            hue[c][1] += sat * h.sin();
            hue[c][2] += 1.0;
            for j in 0..3 {
                rgb[c][j] += mean[j];
            }
            rgb[c][3] += 1.0;
            centre[c][0] += (s.bbox[0] + s.bbox[2]) as f64 / 2.0;
            centre[c][1] += (s.bbox[1] + s.bbox[3]) as f64 / 2.0;
        }
        for c in 0..6 {
            let len = (hue[c][0].powi(2) + hue[c][1].powi(2)).sqrt() / hue[c][2];
            assert!(len < 0.2, "class {c}: mean hue resultant {len}");
            for j in 0..3 {
                let m = rgb[c][j] / rgb[c][3];
                // Uniform channel: sd ~74, standard error ~7.4 for ~100 samples.
                assert!((m - 127.5).abs() < 30.0, "class {c} channel {j}: mean {m}");
            }
            for (j, sum) in centre[c].iter().enumerate() {
                let m = sum / rgb[c][3];
                assert!((m - 48.0).abs() < 6.0, "class {c}: mean centre {j} = {m}");
            }
        }
    }

    #[test]
    fn shapes_match_their_class() {
        // The rendered silhouette's area relative to its circumscribed circle tells circle,
        // square, triangle, star and cross apart; the ring has a hole at its centre.
        let expect = |c: usize| match c {
            0 => 1.0,
            1 => 2.0 / PI,
            2 => 3.0 * 3f32.sqrt() / (4.0 * PI),
            3 => 5.0 * 0.42 * (PI / 5.0).sin() / PI,
            4 => (8.0 * 0.28 * 0.95 - 4.0 * 0.28 * 0.28) / PI,
            _ => 1.0 - 0.55 * 0.55,
        };
        for i in 0..60 {
            let s = sample(9, i, DEFAULT_SIZE);
            // Re-derive the object geometry from the same stream (class, background, object).
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            rng.set_stream(i);
            let _ = rng.random_range(0..CLASSES.len());
            background(&mut Canvas::new(224, 224), &mut rng, 1.0);
            let o = Object::random(
                s.class_id,
                224.0,
                224.0,
                Scene::BENCHMARK.diameter,
                &mut rng,
            );
            let area = s.mask.pixels().filter(|p| p[0] == 255).count() as f32;
            let ratio = area / (PI * o.radius * o.radius);
            let want = expect(s.class_id);
            assert!(
                (ratio - want).abs() < 0.06 + 3.0 / o.radius,
                "sample {i} class {}: area ratio {ratio}, expected {want}",
                s.class_id
            );
            let centre = s.mask.get_pixel(o.cx as u32, o.cy as u32)[0];
            assert_eq!(
                centre == 0,
                s.class_id == 5,
                "sample {i}: centre pixel {centre}"
            );
        }
    }

    #[test]
    fn dataset_is_deterministic_and_manifest_round_trips() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        write_dataset(a.path(), 4, 42, &Scene::BENCHMARK, &mut |n| seen.push(n)).unwrap();
        write_dataset(b.path(), 4, 42, &Scene::BENCHMARK, &mut |_| {}).unwrap();
        assert_eq!(seen, vec![1, 2, 3, 4]);
        let mut names: Vec<_> = std::fs::read_dir(a.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 13, "{names:?}");
        for name in &names {
            let x = std::fs::read(a.path().join(name)).unwrap();
            let y = std::fs::read(b.path().join(name)).unwrap();
            assert_eq!(x, y, "{name} differs between two runs");
        }
        let entries = read_manifest(&a.path().join("manifest.jsonl")).unwrap();
        assert_eq!(entries.len(), 4);
        for (i, e) in entries.iter().enumerate() {
            let s = sample(42, i as u64, DEFAULT_SIZE);
            let want = ManifestEntry {
                image: format!("{i:05}.png"),
                class_id: s.class_id,
                class_name: CLASSES[s.class_id].into(),
                bbox: s.bbox,
                mask: Some(format!("{i:05}.mask.png")),
                background: Some(format!("{i:05}.background.png")),
            };
            assert_eq!(e, &want);
            let img = image::open(a.path().join(&e.image)).unwrap().to_rgb8();
            assert_eq!(img.as_raw(), s.image.as_raw());
            let bg = image::open(a.path().join(e.background.as_ref().unwrap())).unwrap();
            let (_, want_bg) =
                sample_with_background(&Scene::BENCHMARK, 42, i as u64, DEFAULT_SIZE);
            assert_eq!(bg.to_rgb8().as_raw(), want_bg.as_raw());
            let mask = image::open(a.path().join(e.mask.as_ref().unwrap())).unwrap();
            assert_eq!(mask.to_luma8().as_raw(), s.mask.as_raw());
        }
        let first = std::fs::read_to_string(a.path().join("manifest.jsonl")).unwrap();
        let line = first.lines().next().unwrap();
        assert!(
            line.starts_with(r#"{"image":"00000.png","class_id":"#),
            "{line}"
        );
    }

    #[test]
    fn malformed_manifest_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("manifest.jsonl");
        let good =
            r#"{"image": "a.png", "class_id": 1, "class_name": "square", "bbox": [1, 2, 3, 4]}"#;
        std::fs::write(
            &p,
            format!("{good}\n\n{{\"image\": \"b.png\", \"class_id\": \n"),
        )
        .unwrap();
        let e = read_manifest(&p).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("manifest.jsonl"), "{e}");
        // A missing mask is allowed; a wrong type is not.
        std::fs::write(&p, format!("{good}\n")).unwrap();
        assert_eq!(read_manifest(&p).unwrap()[0].mask, None);
        std::fs::write(&p, good.replace("[1, 2, 3, 4]", "[1, 2, 3]")).unwrap();
        let e = read_manifest(&p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let missing = read_manifest(&dir.path().join("nope.jsonl")).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }), "{missing}");
    }

    #[test]
    fn zero_count_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_dataset(dir.path(), 0, 0, &Scene::BENCHMARK, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("count 0"), "{e}");
    }

    #[test]
    fn clutter_one_is_the_benchmark_and_zero_is_plain() {
        let a = sample(9, 4, (64, 64));
        let b = sample_in(&Scene::BENCHMARK.with_clutter(1.0), 9, 4, (64, 64));
        assert_eq!(a.image, b.image);
        // Roughness of the background: mean absolute difference of horizontal neighbours
        // outside the object.
        let rough = |s: &Sample| {
            let (mut sum, mut n) = (0f64, 0usize);
            for y in 0..64 {
                for x in 0..63 {
                    if s.mask.get_pixel(x, y).0[0] == 0 && s.mask.get_pixel(x + 1, y).0[0] == 0 {
                        let (p, q) = (s.image.get_pixel(x, y).0, s.image.get_pixel(x + 1, y).0);
                        sum += (0..3)
                            .map(|c| (f64::from(p[c]) - f64::from(q[c])).abs())
                            .sum::<f64>();
                        n += 1;
                    }
                }
            }
            sum / n as f64
        };
        let plain = sample_in(&Scene::BENCHMARK.with_clutter(0.0), 9, 4, (64, 64));
        assert_eq!(plain.class_id, a.class_id);
        assert!(
            rough(&plain) < 0.5 * rough(&a),
            "{} vs {}",
            rough(&plain),
            rough(&a)
        );
        let dir = tempfile::tempdir().unwrap();
        let scene = Scene::BENCHMARK.with_clutter(1.5);
        let e = write_dataset(dir.path(), 1, 0, &scene, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("clutter 1.5 out of range"), "{e}");
        for diameter in [(0.0, 0.4), (0.5, 0.4), (0.3, 0.95), (f32::NAN, 0.4)] {
            let scene = Scene {
                diameter,
                ..Scene::BENCHMARK
            };
            let e = write_dataset(dir.path(), 1, 0, &scene, &mut |_| {}).unwrap_err();
            assert!(e.to_string().contains("object size"), "{e}");
        }
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn benchmark_objects_spread_further_than_training_ones() {
        // Same seeds, so the same classes and draws; only the size range differs. The
        // benchmark's objects are no larger than 45% of the side and their centres reach
        // further from the image's centre (what lets a map beat a centred blob).
        let (mut far_benchmark, mut far_training) = (0, 0);
        for i in 0..300 {
            let b = sample(3, i, (100, 100));
            let t = sample_in(&Scene::TRAINING, 3, i, (100, 100));
            assert_eq!(b.class_id, t.class_id);
            let side = |s: &Sample| (s.bbox[2] - s.bbox[0]).max(s.bbox[3] - s.bbox[1]);
            assert!(side(&b) <= 46, "sample {i}: {:?}", b.bbox);
            let off = |s: &Sample| {
                let cx = (s.bbox[0] + s.bbox[2]) as f64 / 2.0 - 50.0;
                let cy = (s.bbox[1] + s.bbox[3]) as f64 / 2.0 - 50.0;
                cx.abs().max(cy.abs())
            };
            far_benchmark += usize::from(off(&b) > 20.0);
            far_training += usize::from(off(&t) > 20.0);
        }
        assert!(
            far_benchmark > 2 * far_training,
            "{far_benchmark} vs {far_training} of 300 centred more than 20% off"
        );
    }
}
