//! `vitcx eval`: faithfulness of explanations over a data set (deletion/insertion AUC, pointing
//! game, energy pointing game, accuracy), written as a per-image CSV, a JSON summary with 95%
//! confidence intervals and plots of the mean deletion and insertion curves.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vitcx::eval::metrics::{self, Baseline, CurveParams};
use vitcx::methods::vitcx::argmax;
use vitcx::model::{Backbone, ModelConfig, VisionTransformer};
use vitcx::{Explainer, Method, Targets};

use crate::args::{CurveArgs, EvalArgs};
use crate::progress::Bars;

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

/// One row of `per_image.csv`: one image explained by one method.
struct Row {
    method: Method,
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

/// Curve settings from the flags, checked before any model or image is read.
pub fn curve_params(c: &CurveArgs, batch: usize) -> Result<CurveParams> {
    let baseline = |name: &str, flag: &str| -> Result<Baseline> {
        match name {
            "zero" => Ok(Baseline::Zero),
            "blur" => Ok(Baseline::Blur {
                kernel: c.blur_kernel,
                sigma: c.blur_sigma,
            }),
            other => bail!("unknown {flag} '{other}'; expected zero or blur"),
        }
    };
    let curve = CurveParams {
        step: c.step,
        deletion_baseline: baseline(&c.deletion_baseline, "--deletion-baseline")?,
        insertion_baseline: baseline(&c.insertion_baseline, "--insertion-baseline")?,
        batch,
    };
    if curve.step == 0 {
        bail!("--step 0; expected at least 1 pixel per step");
    }
    if [c.deletion_baseline.as_str(), c.insertion_baseline.as_str()].contains(&"blur") {
        metrics::gaussian_kernel(c.blur_kernel, c.blur_sigma)?;
    }
    Ok(curve)
}

/// The curve settings as they go into reports.
pub fn curve_json(curve: &CurveParams) -> serde_json::Value {
    let blur = |b: &Baseline| match *b {
        Baseline::Zero => json!({ "kind": "zero" }),
        Baseline::Blur { kernel, sigma } => json!({
            "kind": "blur", "kernel": kernel,
            "sigma": sigma.to_string().parse::<f64>().unwrap_or(f64::NAN),
            "border": "reflect (edge pixel not repeated)", "space": "normalised, per channel",
        }),
    };
    json!({
        "step": curve.step,
        "batch": curve.batch,
        "deletion_baseline": blur(&curve.deletion_baseline),
        "insertion_baseline": blur(&curve.insertion_baseline),
        "pixel_order": "saliency descending, ties by lower row-major index",
        "auc": "trapezoid rule over the fraction of pixels changed, x in [0, 1]",
    })
}

pub fn run(a: EvalArgs, device: &candle_core::Device) -> Result<ExitCode> {
    let methods = Method::parse_list(&a.methods).context("--methods")?;
    let curve = curve_params(&a.curve, a.vitcx.batch)?;
    if matches!(a.limit, Some(0)) {
        bail!("--limit 0; expected at least 1 image");
    }
    let mut entries = read_data(&a.data)?;
    if let Some(n) = a.limit {
        entries.truncate(n);
    }
    let model = crate::load_model(a.model.as_deref(), device)?;
    let params = crate::args::method_params(&a.vitcx, &a.other);
    let explainers = methods
        .iter()
        .map(|&m| Explainer::new(m, &params, &model))
        .collect::<vitcx::Result<Vec<_>>>()?;
    let cfg = model.config().clone();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create output directory {}", a.out.display()))?;

    let mut bars = Bars::new((entries.len() * explainers.len()) as u64, a.quiet);
    bars.images.set_prefix("eval");
    let mut rows = Vec::new();
    let mut seconds = vec![0f64; explainers.len()];
    let mut failures = 0usize;
    for (index, e) in entries.iter().enumerate() {
        let shown = e.path.display().to_string();
        let name = e
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let input = match prepare(&model, &cfg, e) {
            Ok(input) => input,
            Err(err) => {
                failures += 1;
                bars.report_failure(&e.path, &err);
                bars.images.inc(explainers.len() as u64);
                continue;
            }
        };
        for (k, explainer) in explainers.iter().enumerate() {
            let method = explainer.method();
            bars.images
                .set_message(format!("{name} ({})", method.name()));
            let t = std::time::Instant::now();
            match eval_one(&model, explainer, &curve, index, e, &input, &mut bars) {
                Ok(row) => {
                    seconds[k] += t.elapsed().as_secs_f64();
                    bars.println(&format!(
                        "{shown} [{}]: class {} ({}) deletion {:.4} insertion {:.4}",
                        method.name(),
                        row.class,
                        row.class_from,
                        row.deletion.auc,
                        row.insertion.auc
                    ));
                    rows.push(row);
                }
                Err(err) => {
                    failures += 1;
                    bars.report_failure(&e.path, &err.context(method.name()));
                }
            }
            bars.images.inc(1);
        }
    }
    bars.finish();

    write_outputs(&a, &explainers, &curve, &rows, &seconds)?;
    if failures > 0 {
        eprintln!(
            "vitcx: {failures} of {} evaluations failed; results for the others are in {}",
            entries.len() * explainers.len(),
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
        vitcx::methods::vitcx::check_classes(&[id], cfg.num_classes)?;
    }
    Ok(id)
}

/// One image read, resized and normalised, with its ground truth.
struct Input {
    x: Vec<f32>,
    truth: Option<usize>,
    mask: Option<Vec<u8>>,
}

fn prepare(model: &VisionTransformer, cfg: &ModelConfig, e: &Entry) -> Result<Input> {
    let img = vitcx::image::load_rgb(&e.path)?;
    let size = model.spec().input_size;
    let (_, x) = vitcx::image::model_input(&img, size, cfg.preprocess.mean, cfg.preprocess.std);
    let truth = label(e, cfg)?;
    let mask = match (&e.mask, e.bbox) {
        (Some(m), _) => Some(load_mask(m, size)?),
        (None, Some(b)) => Some(bbox_mask(b, (img.width(), img.height()), size)),
        (None, None) => None,
    };
    Ok(Input { x, truth, mask })
}

/// One method's map of one image and its deletion and insertion curves, with the seconds each
/// part took.
pub struct Scored {
    pub probs: Vec<f32>,
    /// The explained class (the first of the targets).
    pub class: usize,
    pub saliency: Vec<f32>,
    pub deletion: metrics::Curve,
    pub insertion: metrics::Curve,
    pub explain_s: f64,
    pub curves_s: f64,
}

/// Explains `x` with `explainer` for the first of `targets` and scores that map by deletion and
/// insertion (`index`: the image's position in a data set, for the seeded controls).
pub fn explain_and_score(
    model: &VisionTransformer,
    explainer: &Explainer,
    x: &[f32],
    targets: &Targets,
    index: usize,
    curve: &CurveParams,
    bars: &mut Bars,
) -> Result<Scored> {
    let t = std::time::Instant::now();
    let mut ex = explainer.explain(model, x, targets, index as u64, bars)?;
    let explain_s = t.elapsed().as_secs_f64();
    let class = ex.classes[0];
    let saliency = ex.saliency.pop().context("explanation has no saliency")?;
    let t = std::time::Instant::now();
    let deletion = metrics::deletion(model, x, &saliency, class, curve)?;
    let insertion = metrics::insertion(model, x, &saliency, class, curve)?;
    Ok(Scored {
        probs: ex.probs,
        class,
        saliency,
        deletion,
        insertion,
        explain_s,
        curves_s: t.elapsed().as_secs_f64(),
    })
}

fn eval_one(
    model: &VisionTransformer,
    explainer: &Explainer,
    curve: &CurveParams,
    index: usize,
    e: &Entry,
    input: &Input,
    bars: &mut Bars,
) -> Result<Row> {
    let x = &input.x;
    let targets = match input.truth {
        Some(t) => Targets::Classes(vec![t]),
        None => Targets::TopK(1),
    };
    let s = explain_and_score(model, explainer, x, &targets, index, curve, bars)?;
    let predicted = argmax(&s.probs);
    let mask = input.mask.as_ref();
    Ok(Row {
        method: explainer.method(),
        image: e.image.display().to_string(),
        class: s.class,
        class_from: if input.truth.is_some() {
            "label"
        } else {
            "top1"
        },
        predicted,
        correct: input.truth.map(|t| t == predicted),
        pointing: mask.map(|m| metrics::pointing_game(&s.saliency, m)),
        energy: mask.map(|m| metrics::energy_pointing_game(&s.saliency, m)),
        deletion: s.deletion,
        insertion: s.insertion,
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

/// The metrics of each method, in the order of [`METRICS`], where they exist.
fn summaries(rows: &[Row], method: Method) -> Vec<(&'static str, metrics::Summary)> {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.method == method).collect();
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let columns: [(&str, Vec<f64>); 5] = [
        (
            "deletion_auc",
            rows.iter().map(|r| r.deletion.auc).collect(),
        ),
        (
            "insertion_auc",
            rows.iter().map(|r| r.insertion.auc).collect(),
        ),
        (
            "pointing_game",
            rows.iter().filter_map(|r| r.pointing.map(flag)).collect(),
        ),
        (
            "energy_pointing_game",
            rows.iter().filter_map(|r| r.energy).collect(),
        ),
        (
            "accuracy",
            rows.iter().filter_map(|r| r.correct.map(flag)).collect(),
        ),
    ];
    columns
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(name, v)| (name, metrics::summarize(&v)))
        .collect()
}

/// The metrics in table order, with the direction that is better.
const METRICS: [(&str, &str); 5] = [
    ("deletion_auc", "lower is better"),
    ("insertion_auc", "higher is better"),
    ("pointing_game", "higher is better"),
    ("energy_pointing_game", "higher is better"),
    ("accuracy", "of the model"),
];

fn write_outputs(
    a: &EvalArgs,
    explainers: &[Explainer],
    curve: &CurveParams,
    rows: &[Row],
    seconds: &[f64],
) -> Result<()> {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let mut csv = String::from(
        "method,image,class,class_from,predicted,correct,deletion_auc,insertion_auc,pointing_game,energy_pointing_game\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            r.method.name(),
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
    vitcx::io::output::write_atomic(&a.out.join("per_image.csv"), csv.as_bytes())?;

    let mut report = serde_json::Map::new();
    let mut table_csv = String::from("method,metric,mean,ci95_low,ci95_high,n\n");
    let mut md = String::from(
        "| method | deletion AUC ↓ | insertion AUC ↑ | pointing game ↑ | energy pointing game ↑ | s per image |\n|---|---|---|---|---|---|\n",
    );
    let mut params = serde_json::Map::new();
    let mut cost = serde_json::Map::new();
    // The model's accuracy, the same for every method; reported once, from the first.
    let mut accuracy = None;
    for (k, ex) in explainers.iter().enumerate() {
        let method = ex.method();
        let sums = summaries(rows, method);
        if k == 0 {
            accuracy = sums.iter().find(|(n, _)| *n == "accuracy").map(|(_, s)| *s);
        }
        let mut m = serde_json::Map::new();
        for (name, s) in &sums {
            m.insert((*name).into(), serde_json::to_value(s)?);
            table_csv.push_str(&format!(
                "{},{name},{},{},{},{}\n",
                method.name(),
                s.mean,
                s.ci95[0],
                s.ci95[1],
                s.n
            ));
        }
        report.insert(method.name().into(), serde_json::Value::Object(m));
        params.insert(method.name().into(), ex.params_json());
        let n = rows.iter().filter(|r| r.method == method).count();
        let per_image = if n > 0 {
            seconds[k] / n as f64
        } else {
            f64::NAN
        };
        cost.insert(method.name().into(), json!(per_image));
        let cell = |metric: &str| {
            sums.iter()
                .find(|(name, _)| *name == metric)
                .map(|(_, s)| format!("{:.3} [{:.3}, {:.3}]", s.mean, s.ci95[0], s.ci95[1]))
                .unwrap_or_else(|| "–".into())
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} |\n",
            method.title(),
            cell("deletion_auc"),
            cell("insertion_auc"),
            cell("pointing_game"),
            cell("energy_pointing_game"),
            per_image
        ));
    }
    let images = rows
        .iter()
        .map(|r| r.image.as_str())
        .collect::<std::collections::HashSet<_>>();
    if let Some(acc) = accuracy {
        md.push_str(&format!(
            "\nModel accuracy on these images: {:.3} [{:.3}, {:.3}] (n = {}).\n",
            acc.mean, acc.ci95[0], acc.ci95[1], acc.n
        ));
    }
    md.push_str(&format!(
        "\nMean [95% interval] over {} images; curves step {} pixels, deletion to {}, insertion from {}; seconds per image include the curves.\n",
        images.len(),
        curve.step,
        curve.deletion_baseline.name(),
        curve.insertion_baseline.name()
    ));
    let names: Vec<&str> = explainers.iter().map(|e| e.method().name()).collect();
    let mut settings = json!({
        "methods": names,
        "method_params": params,
        "seconds_per_image": cost,
        "model": crate::model_name(&a.model),
        "data": a.data.display().to_string(),
        "images": images.len(),
        "explained_class": "the label where the data gives one, else the top-1 prediction",
        "ci95": "mean +- t(0.975, n-1) * sd / sqrt(n); [mean, mean] for n = 1",
        "metrics": METRICS.iter().map(|(m, d)| json!({"name": m, "note": d})).collect::<Vec<_>>(),
        "vitcx_version": env!("CARGO_PKG_VERSION"),
    });
    if let (Some(s), serde_json::Value::Object(c)) = (settings.as_object_mut(), curve_json(curve)) {
        s.extend(c);
    }
    report.insert("settings".into(), settings);
    vitcx::io::output::write_json_atomic(
        &a.out.join("summary.json"),
        &serde_json::Value::Object(report),
    )?;
    vitcx::io::output::write_atomic(&a.out.join("table.csv"), table_csv.as_bytes())?;
    vitcx::io::output::write_atomic(&a.out.join("table.md"), md.as_bytes())?;

    for (name, pick) in [
        (
            "deletion",
            (|r: &Row| &r.deletion) as fn(&Row) -> &metrics::Curve,
        ),
        ("insertion", |r: &Row| &r.insertion),
    ] {
        let mut series = Vec::new();
        let mut x = Vec::new();
        for ex in explainers {
            let method = ex.method();
            let mine: Vec<&Row> = rows.iter().filter(|r| r.method == method).collect();
            let Some(first) = mine.first() else { continue };
            x = pick(first).x.clone();
            let mut mean = vec![0f64; x.len()];
            for r in &mine {
                for (m, &p) in mean.iter_mut().zip(&pick(r).probs) {
                    *m += f64::from(p) / mine.len() as f64;
                }
            }
            let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
            let label = format!("{} AUC={:.3}", method.title(), metrics::auc(&x, &mean));
            series.push((label, mean));
        }
        if series.is_empty() {
            continue;
        }
        let title = format!("{name}, mean over {} images", images.len());
        let img = metrics::plot_curves(&x, &series, &title, "fraction of pixels", "probability");
        vitcx::io::render::save_png(&img, &a.out.join(format!("{name}.png")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
