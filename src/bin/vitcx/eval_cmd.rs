//! `vitcx eval`: faithfulness of explanations over a data set (deletion/insertion AUC, pointing
//! game, energy pointing game, accuracy), written as a per-image CSV, a JSON summary with 95%
//! confidence intervals and plots of the mean deletion and insertion curves.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vitcx::explain::{argmax, Noise, VitCx};
use vitcx::metrics::{self, Baseline, CurveParams};
use vitcx::model::{Backbone, ModelConfig, VisionTransformer};

use crate::args::EvalArgs;
use crate::progress::Bars;

/// Explanation methods `eval` can score. More plug in here: a variant, its name, its setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    VitCx,
    /// Control: independent uniform noise per pixel.
    Random,
    /// Control: a centred Gaussian blob.
    Center,
}

impl Method {
    const ALL: [Method; 3] = [Method::VitCx, Method::Random, Method::Center];

    fn name(self) -> &'static str {
        match self {
            Method::VitCx => "vitcx",
            Method::Random => "random",
            Method::Center => "center",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| {
                let names: Vec<_> = Self::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown --method '{s}'; supported methods: {}",
                    names.join(", ")
                )
            })
    }
}

/// A method set up for one model.
enum Explainer {
    VitCx(VitCx),
    Random { seed: u64 },
    Center,
}

impl Explainer {
    fn new(method: Method, a: &EvalArgs, model: &VisionTransformer) -> Result<Self> {
        match method {
            Method::VitCx => Ok(Explainer::VitCx(VitCx::new(&a.vitcx.params(), model)?)),
            Method::Random => Ok(Explainer::Random { seed: a.vitcx.seed }),
            Method::Center => Ok(Explainer::Center),
        }
    }

    /// Clean probabilities `(C)` and the saliency `(H, W)` of the class chosen by `pick`, for
    /// the `index`-th image of the data set.
    fn explain(
        &self,
        model: &VisionTransformer,
        x: &[f32],
        index: usize,
        pick: impl FnOnce(&[f32]) -> usize,
        bars: &mut Bars,
    ) -> Result<(Vec<f32>, usize, Vec<f32>)> {
        let control = match self {
            Explainer::VitCx(m) => {
                let prepared = m.prepare(model, x, bars)?;
                let class = pick(&prepared.probs);
                let noise = Noise::Seeded(m.params().params.seed);
                let mut ex = m.score(model, x, prepared, &[class], &noise, bars)?;
                let saliency = ex.saliency.pop().context("explanation has no saliency")?;
                return Ok((ex.probs, class, saliency));
            }
            Explainer::Random { seed } => {
                vitcx::controls::random_map(model.spec().input_size, *seed, index as u64)
            }
            Explainer::Center => vitcx::controls::centered_gaussian(model.spec().input_size),
        };
        let (h, w) = model.spec().input_size;
        let px = candle_core::Tensor::from_vec(x.to_vec(), (1, 3, h, w), model.device())?;
        let probs = model.probs(&px)?.flatten_all()?.to_vec1::<f32>()?;
        let class = pick(&probs);
        Ok((probs, class, control))
    }

    fn params(&self) -> serde_json::Value {
        match self {
            Explainer::Random { seed } => json!({
                "map": "independent uniform [0, 1) per pixel, ChaCha8 stream = image index",
                "seed": seed,
            }),
            Explainer::Center => json!({
                "map": "Gaussian blob at the image centre, peak 1",
                "sigma_fraction_of_side": vitcx::controls::CENTER_SIGMA,
            }),
            Explainer::VitCx(m) => {
                let p = &m.params().params;
                json!({
                    "layer": m.params().layer,
                    "layer_arg": p.layer,
                    "threshold": p.threshold,
                    "noise_std": p.noise_std.to_string().parse::<f64>().unwrap_or(f64::NAN),
                    "seed": p.seed,
                    "batch": p.batch,
                })
            }
        }
    }
}

/// One manifest line; everything but `image` is optional so a plain list of images works.
#[derive(Debug, serde::Deserialize)]
struct Entry {
    /// As written in the manifest (relative to it); reported in the CSV.
    image: PathBuf,
    /// `image` resolved against the manifest's directory.
    #[serde(skip)]
    path: PathBuf,
    #[serde(default)]
    class_id: Option<usize>,
    #[serde(default)]
    class_name: Option<String>,
    /// `[x0, y0, x1, y1]` in original image pixels, `x1`/`y1` exclusive.
    #[serde(default)]
    bbox: Option<[f64; 4]>,
    #[serde(default)]
    mask: Option<PathBuf>,
}

/// One row of `per_image.csv`.
struct Row {
    image: String,
    class: usize,
    class_from: &'static str,
    predicted: usize,
    correct: Option<bool>,
    deletion: metrics::Curve,
    insertion: metrics::Curve,
    pointing: Option<bool>,
    energy: Option<f64>,
}

pub fn run(a: EvalArgs) -> Result<ExitCode> {
    let method = Method::parse(&a.method)?;
    let baseline = |name: &str, flag: &str| -> Result<Baseline> {
        match name {
            "zero" => Ok(Baseline::Zero),
            "blur" => Ok(Baseline::Blur {
                kernel: a.blur_kernel,
                sigma: a.blur_sigma,
            }),
            other => bail!("unknown {flag} '{other}'; expected zero or blur"),
        }
    };
    let curve = CurveParams {
        step: a.step,
        deletion_baseline: baseline(&a.deletion_baseline, "--deletion-baseline")?,
        insertion_baseline: baseline(&a.insertion_baseline, "--insertion-baseline")?,
        batch: a.vitcx.batch,
    };
    if curve.step == 0 {
        bail!("--step 0; expected at least 1 pixel per step");
    }
    if matches!(a.limit, Some(0)) {
        bail!("--limit 0; expected at least 1 image");
    }
    // Checks the blur settings (when used) before any model or image is read.
    if [a.deletion_baseline.as_str(), a.insertion_baseline.as_str()].contains(&"blur") {
        metrics::gaussian_kernel(a.blur_kernel, a.blur_sigma)?;
    }
    let mut entries = read_data(&a.data)?;
    if let Some(n) = a.limit {
        entries.truncate(n);
    }
    let model = crate::load_model(a.model.as_deref())?;
    let explainer = Explainer::new(method, &a, &model)?;
    let cfg = model.config().clone();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create output directory {}", a.out.display()))?;

    let mut bars = Bars::new(entries.len() as u64, a.quiet);
    bars.images.set_prefix("eval");
    let mut rows = Vec::new();
    let mut failures = 0usize;
    for (index, e) in entries.iter().enumerate() {
        let shown = e.path.display().to_string();
        bars.images.set_message(
            e.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        match eval_one(&model, &cfg, &explainer, &curve, index, e, &mut bars) {
            Ok(row) => {
                bars.println(&format!(
                    "{shown}: class {} ({}) deletion {:.4} insertion {:.4}",
                    row.class, row.class_from, row.deletion.auc, row.insertion.auc
                ));
                rows.push(row);
            }
            Err(err) => {
                failures += 1;
                bars.report_failure(&e.path, &err);
            }
        }
        bars.images.inc(1);
    }
    bars.finish();

    write_outputs(&a, method, &explainer, &curve, &rows)?;
    if failures > 0 {
        eprintln!(
            "vitcx: {failures} of {} images failed; results for the others are in {}",
            entries.len(),
            a.out.display()
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// The entries named by `--data`: a manifest file, a directory holding `manifest.jsonl`, or a
/// directory of images (no ground truth). Paths become relative to the manifest's directory.
fn read_data(data: &Path) -> Result<Vec<Entry>> {
    let manifest = if data.is_dir() {
        let m = data.join("manifest.jsonl");
        if !m.is_file() {
            let images = crate::inputs::expand(&[data.display().to_string()])?;
            return Ok(images
                .into_iter()
                .map(|path| Entry {
                    image: path.strip_prefix(data).unwrap_or(&path).to_path_buf(),
                    path,
                    class_id: None,
                    class_name: None,
                    bbox: None,
                    mask: None,
                })
                .collect());
        }
        m
    } else {
        data.to_path_buf()
    };
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read manifest {}", manifest.display()))?;
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut e: Entry = serde_json::from_str(line).with_context(|| {
            format!("{} line {}: bad manifest entry", manifest.display(), k + 1)
        })?;
        e.path = dir.join(&e.image);
        e.mask = e.mask.map(|m| dir.join(m));
        entries.push(e);
    }
    if entries.is_empty() {
        bail!("manifest {} lists no image", manifest.display());
    }
    Ok(entries)
}

/// The ground-truth class: `class_id`, else `class_name` looked up in the model's labels.
fn label(e: &Entry, cfg: &ModelConfig) -> Result<Option<usize>> {
    let id = match (e.class_id, &e.class_name) {
        (Some(id), _) => Some(id),
        (None, Some(name)) => cfg.labels.iter().position(|l| l == name),
        (None, None) => None,
    };
    if let Some(id) = id {
        vitcx::explain::check_classes(&[id], cfg.num_classes)?;
    }
    Ok(id)
}

fn eval_one(
    model: &VisionTransformer,
    cfg: &ModelConfig,
    explainer: &Explainer,
    curve: &CurveParams,
    index: usize,
    e: &Entry,
    bars: &mut Bars,
) -> Result<Row> {
    let img = vitcx::image::load_rgb(&e.path)?;
    let size = model.spec().input_size;
    let resized = vitcx::image::resize_bilinear(&img, size);
    let x = vitcx::image::to_input(&resized, cfg.preprocess.mean, cfg.preprocess.std);
    let truth = label(e, cfg)?;
    let mask = match (&e.mask, e.bbox) {
        (Some(m), _) => Some(load_mask(m, size)?),
        (None, Some(b)) => Some(bbox_mask(b, (img.width(), img.height()), size)),
        (None, None) => None,
    };
    let (probs, class, saliency) =
        explainer.explain(model, &x, index, |p| truth.unwrap_or(argmax(p)), bars)?;
    let predicted = argmax(&probs);
    let deletion = metrics::deletion(model, &x, &saliency, class, curve)?;
    let insertion = metrics::insertion(model, &x, &saliency, class, curve)?;
    Ok(Row {
        image: e.image.display().to_string(),
        class,
        class_from: if truth.is_some() { "label" } else { "top1" },
        predicted,
        correct: truth.map(|t| t == predicted),
        deletion,
        insertion,
        pointing: mask.as_ref().map(|m| metrics::pointing_game(&saliency, m)),
        energy: mask
            .as_ref()
            .map(|m| metrics::energy_pointing_game(&saliency, m)),
    })
}

/// A mask PNG (nonzero = object) resized to `(H, W)` by nearest neighbour (half-pixel centres).
fn load_mask(path: &Path, (h, w): (usize, usize)) -> Result<Vec<u8>> {
    let m = image::open(path)
        .with_context(|| format!("cannot read mask {}", path.display()))?
        .to_luma8();
    let (mw, mh) = (m.width() as usize, m.height() as usize);
    let near = |d: usize, out: usize, src: usize| ((2 * d + 1) * src / (2 * out)).min(src - 1);
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let sy = near(y, h, mh);
        for x in 0..w {
            let sx = near(x, w, mw);
            out.push(u8::from(m.get_pixel(sx as u32, sy as u32).0[0] != 0));
        }
    }
    Ok(out)
}

/// A box `[x0, y0, x1, y1]` in original pixels (end exclusive) as a mask `(H, W)`: a model
/// pixel is inside when its centre, mapped back to the original image, is.
fn bbox_mask(b: [f64; 4], (iw, ih): (u32, u32), (h, w): (usize, usize)) -> Vec<u8> {
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let cy = (y as f64 + 0.5) * f64::from(ih) / h as f64;
        for x in 0..w {
            let cx = (x as f64 + 0.5) * f64::from(iw) / w as f64;
            out.push(u8::from(cx >= b[0] && cx < b[2] && cy >= b[1] && cy < b[3]));
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write_outputs(
    a: &EvalArgs,
    method: Method,
    explainer: &Explainer,
    curve: &CurveParams,
    rows: &[Row],
) -> Result<()> {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let mut csv = String::from(
        "image,class,class_from,predicted,correct,deletion_auc,insertion_auc,pointing_game,energy_pointing_game\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            csv_field(&r.image),
            r.class,
            r.class_from,
            r.predicted,
            opt(r.correct.map(|c| c.to_string())),
            r.deletion.auc,
            r.insertion.auc,
            opt(r.pointing.map(|c| c.to_string())),
            opt(r.energy.map(|c| c.to_string())),
        ));
    }
    vitcx::output::write_atomic(&a.out.join("per_image.csv"), csv.as_bytes())?;

    let summary = |v: Vec<f64>| serde_json::to_value(metrics::summarize(&v));
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let mut m = serde_json::Map::new();
    m.insert(
        "deletion_auc".into(),
        summary(rows.iter().map(|r| r.deletion.auc).collect())?,
    );
    m.insert(
        "insertion_auc".into(),
        summary(rows.iter().map(|r| r.insertion.auc).collect())?,
    );
    let pointing: Vec<f64> = rows.iter().filter_map(|r| r.pointing.map(flag)).collect();
    if !pointing.is_empty() {
        m.insert("pointing_game".into(), summary(pointing)?);
        m.insert(
            "energy_pointing_game".into(),
            summary(rows.iter().filter_map(|r| r.energy).collect())?,
        );
    }
    let correct: Vec<f64> = rows.iter().filter_map(|r| r.correct.map(flag)).collect();
    if !correct.is_empty() {
        m.insert("accuracy".into(), summary(correct)?);
    }
    let blur = |b: &Baseline| match *b {
        Baseline::Zero => json!({ "kind": "zero" }),
        Baseline::Blur { kernel, sigma } => json!({
            "kind": "blur", "kernel": kernel,
            "sigma": sigma.to_string().parse::<f64>().unwrap_or(f64::NAN),
            "border": "reflect (edge pixel not repeated)", "space": "normalised, per channel",
        }),
    };
    let report = json!({
        method.name(): m,
        "settings": {
            "method": method.name(),
            "method_params": explainer.params(),
            "model": crate::model_name(&a.model),
            "data": a.data.display().to_string(),
            "images": rows.len(),
            "step": curve.step,
            "batch": curve.batch,
            "deletion_baseline": blur(&curve.deletion_baseline),
            "insertion_baseline": blur(&curve.insertion_baseline),
            "explained_class": "the label where the data gives one, else the top-1 prediction",
            "pixel_order": "saliency descending, ties by lower row-major index",
            "auc": "trapezoid rule over the fraction of pixels changed, x in [0, 1]",
            "ci95": "mean +- t(0.975, n-1) * sd / sqrt(n); [mean, mean] for n = 1",
            "vitcx_version": env!("CARGO_PKG_VERSION"),
        },
    });
    vitcx::output::write_json_atomic(&a.out.join("summary.json"), &report)?;

    for (name, pick) in [
        (
            "deletion",
            (|r: &Row| &r.deletion) as fn(&Row) -> &metrics::Curve,
        ),
        ("insertion", |r: &Row| &r.insertion),
    ] {
        let Some(first) = rows.first() else { break };
        let x = &pick(first).x;
        let mut mean = vec![0f64; x.len()];
        for r in rows {
            for (m, &p) in mean.iter_mut().zip(&pick(r).probs) {
                *m += f64::from(p) / rows.len() as f64;
            }
        }
        let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
        let title = format!(
            "{name} ({})  mean AUC={:.4}  n={}",
            method.name(),
            metrics::auc(x, &mean),
            rows.len()
        );
        let img = metrics::plot_curve(x, &mean, &title, "fraction of pixels", "probability");
        vitcx::render::save_png(&img, &a.out.join(format!("{name}.png")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip_and_unknown_lists_supported() {
        assert_eq!(Method::parse("vitcx").unwrap(), Method::VitCx);
        assert_eq!(Method::parse("center").unwrap(), Method::Center);
        let err = format!("{:#}", Method::parse("rise").unwrap_err());
        assert_eq!(
            err,
            "unknown --method 'rise'; supported methods: vitcx, random, center"
        );
    }

    #[test]
    fn bbox_mask_scales_to_model_size() {
        // A 4x2 image whose box covers its left half, on a 2x4 model grid.
        let m = bbox_mask([0.0, 0.0, 2.0, 2.0], (4, 2), (2, 4));
        assert_eq!(m, [1, 1, 0, 0, 1, 1, 0, 0]);
    }

    #[test]
    fn mask_png_resized_by_nearest_neighbour() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.png");
        // 2x2 mask: top-right pixel inside (value 7, any nonzero counts).
        image::GrayImage::from_raw(2, 2, vec![0, 7, 0, 0])
            .unwrap()
            .save(&p)
            .unwrap();
        let m = load_mask(&p, (4, 4)).unwrap();
        assert_eq!(m, [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(load_mask(&dir.path().join("none.png"), (4, 4)).is_err());
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a.png"), "a.png");
        assert_eq!(csv_field("a,b \"c\".png"), "\"a,b \"\"c\"\".png\"");
    }
}
