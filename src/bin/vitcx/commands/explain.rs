//! `vitcx explain`: images in, saliency `.npy`, PNG overlay and JSON report out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use vitcx::model::{Precision, Spec};
use vitcx::run::{Line, Status};
use vitcx::target::{class_id, top_k, Targets};
use vitcx::{Explainer, Explanation};

use crate::args::ExplainArgs;
use crate::common::{load_model_at, model_name};
use crate::progress::Bars;

pub fn run(a: ExplainArgs, device: &candle_core::Device) -> Result<ExitCode> {
    let entry = vitcx::methods::entry(&a.method).context("--method")?;
    let shard = crate::runs::shard(&a.run)?;
    let model = load_model_at(a.model.as_deref(), device, a.input_size)?;
    let model = model.as_ref();
    let params = crate::args::method_params(&a.vitcx, &a.other);
    let method = Explainer::new(entry, &params, model)?;
    let spec = model.spec().clone();
    let classes = resolve_classes(&a, &spec)?;
    let inputs = crate::inputs::expand(&a.images, a.recursive)?;
    if a.vitcx.precision == Precision::Bf16 && device.is_cpu() && !Precision::bf16_is_native() {
        eprintln!(
            "vitcx: --precision bf16: this CPU has no bf16 dot product (AVX512-BF16), so the bf16 \
             passes run about as fast as f32 ({})",
            Precision::bf16_kernel()
        );
    }
    if a.vitcx.precision.is_integer() {
        let name = a.vitcx.precision.name();
        if !device.is_cpu() {
            anyhow::bail!("--precision {name} runs on the CPU only; use f32 or bf16 on a GPU");
        }
        if !Precision::int8_is_native() {
            eprintln!(
                "vitcx: --precision {name}: this CPU has no integer dot product (AVX512-VNNI), so \
                 the {name} passes may be slower than f32 ({})",
                a.vitcx.precision.kernel()
            );
        }
    }
    crate::inputs::refuse_out_holding_inputs(&a.out, &inputs.files)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create output directory {}", a.out.display()))?;

    // Stems come from the whole list, so that every shard names an image alike.
    let stems = crate::inputs::unique(inputs.files.iter().map(|p| file_stem(p)), "-");
    let images: Vec<Image> = inputs
        .files
        .iter()
        .zip(&inputs.keys)
        .zip(stems)
        .enumerate()
        .map(|(index, ((path, key), stem))| Image {
            index,
            stem,
            path: path.clone(),
            key: key.clone(),
        })
        .filter(|im| shard.0.contains(&im.key))
        .collect();
    let settings = settings(&a, &spec, &method, &classes);
    let header = crate::runs::header(
        "explain",
        settings.clone(),
        shard.clone(),
        images.iter().map(|im| im.key.clone()).collect(),
        inputs.files.len(),
    );
    let (mut record, earlier) = crate::runs::open(&a.out, &header, &a.run, false)?;

    // What is already done (a complete set of files made with these settings) is skipped; what
    // failed before is skipped unless --retry-failed.
    let mut failures = 0;
    let mut todo = Vec::new();
    let mut skipped = 0;
    for im in &images {
        if let Some(Status::Failed { reason, .. }) =
            earlier.as_ref().and_then(|r| r.status.get(&im.key))
        {
            if !a.run.retry_failed {
                failures += 1;
                eprintln!(
                    "vitcx: {}: failed in an earlier run: {reason}",
                    im.path.display()
                );
                continue;
            }
        }
        match existing(&a.out, im, &settings)? {
            Existing::Absent => todo.push(im),
            Existing::Complete { seconds, files } => {
                skipped += 1;
                let recorded = matches!(
                    earlier.as_ref().and_then(|r| r.status.get(&im.key)),
                    Some(Status::Done { .. })
                );
                if !recorded {
                    record.append(&done_line(im, seconds, files))?;
                }
            }
            Existing::Other(_) if a.run.force => todo.push(im),
            Existing::Other(why) => bail!(
                "{} already holds {}.json, {why}; use another --out, or --force to overwrite",
                a.out.display(),
                im.stem
            ),
        }
    }
    if skipped > 0 {
        eprintln!(
            "vitcx: {skipped} of {} images already explained in {} with these settings; skipped",
            images.len(),
            a.out.display()
        );
    }

    let mut bars = Bars::new(todo.len() as u64, a.quiet);
    // An argument that names no file is that entry's failure; the others still run. It belongs
    // to no shard: the first reports it.
    if shard.0.index == 0 {
        failures += inputs.bad.len();
        for bad in &inputs.bad {
            bars.println(&format!("vitcx: {bad}"));
        }
    }
    // Three stages overlap: the next image is decoded while one is explained, and the last
    // one's files are written meanwhile (a small model's explanation leaves a core idle). At
    // most one image waits decoded and one is being written, so memory stays flat.
    std::thread::scope(|scope| -> Result<()> {
        let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel(1);
        let (pre, size, resize) = (
            &spec.preprocess,
            spec.input_size,
            a.resize.resize(&spec.preprocess),
        );
        let to_load = todo.clone();
        scope.spawn(move || {
            for im in to_load {
                if loaded_tx.send(load(&im.path, pre, size, resize)).is_err() {
                    break;
                }
            }
        });
        let mut writing = None;
        for (im, loaded) in todo.iter().zip(loaded_rx) {
            bars.images.set_message(
                im.path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            let t = Instant::now();
            let explained = loaded.and_then(|l| {
                let ex = method.explain(model, &l.x, &classes, 0, &mut bars)?;
                let spent = l.load + t.elapsed();
                Ok((l, ex, spent))
            });
            // The previous image's files are written by now, or soon: record it before this
            // one's writing starts.
            if let Some(w) = writing.take() {
                failures += finish(w, &mut record, &bars)?;
            }
            match explained {
                Ok((l, ex, spent)) => {
                    let (spec, a, settings) = (&spec, &a, &settings);
                    let described = method.describe(&ex);
                    let handle = scope.spawn(move || {
                        let t = Instant::now();
                        let (l, ex) = (&l, &ex);
                        let done = write(spec, a, im, (l, ex, &described), settings, spent);
                        (done, spent + t.elapsed())
                    });
                    writing = Some((*im, handle));
                }
                Err(e) => {
                    failures += 1;
                    record_failure(&mut record, &bars, im, &e, t.elapsed())?;
                }
            }
        }
        if let Some(w) = writing.take() {
            failures += finish(w, &mut record, &bars)?;
        }
        Ok(())
    })?;
    bars.finish();
    if failures > 0 {
        eprintln!(
            "vitcx: {failures} of {} images failed; results for the others are in {}",
            images.len()
                + if shard.0.index == 0 {
                    inputs.bad.len()
                } else {
                    0
                },
            a.out.display()
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// One image of the run: its position in the whole list, its key, its path and its stem.
struct Image {
    index: usize,
    key: String,
    path: PathBuf,
    stem: String,
}

fn done_line(im: &Image, seconds: f64, files: Vec<String>) -> Line {
    Line::Done {
        image: im.key.clone(),
        seconds,
        result: json!({ "index": im.index, "files": files }),
    }
}

/// What `--out` holds for an image.
enum Existing {
    /// Nothing (or an incomplete set, which a crash cannot leave but a user can).
    Absent,
    /// A complete set made with these settings: its files and seconds.
    Complete { seconds: f64, files: Vec<String> },
    /// A report made with other settings or for another image, and how it differs.
    Other(String),
}

/// Checks, not assumes, that an image is done: its report names this image and these settings,
/// and every file it lists is there.
fn existing(out: &Path, im: &Image, settings: &serde_json::Value) -> Result<Existing> {
    let report = out.join(format!("{}.json", im.stem));
    if !report.is_file() {
        return Ok(Existing::Absent);
    }
    let Ok(bytes) = vitcx::io::read_bounded(&report, 64 << 20) else {
        return Ok(Existing::Absent);
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok(Existing::Absent);
    };
    if v.get("key").and_then(|k| k.as_str()) != Some(im.key.as_str()) {
        return Ok(Existing::Other(format!(
            "the explanation of {}",
            v.get("image")
                .and_then(|k| k.as_str())
                .unwrap_or("another image")
        )));
    }
    if let Some(d) = vitcx::run::record::difference(&v["settings"], settings) {
        return Ok(Existing::Other(format!("made with other settings ({d})")));
    }
    let mut files: Vec<String> = v["targets"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|x| x["saliency"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if files.is_empty() {
        return Ok(Existing::Absent);
    }
    if let Some(png) = v["overlay"].as_str() {
        files.push(png.to_string());
    }
    if !files.iter().all(|f| out.join(f).is_file()) {
        return Ok(Existing::Absent);
    }
    files.push(format!("{}.json", im.stem));
    let seconds = v["seconds"]["total"].as_f64().unwrap_or(0.0);
    Ok(Existing::Complete { seconds, files })
}

/// Everything that decides an explanation's files, as it goes into each report and the run
/// record: a rerun or another shard with other settings never mixes its files with these.
fn settings(
    a: &ExplainArgs,
    spec: &Spec,
    method: &Explainer,
    classes: &Targets,
) -> serde_json::Value {
    let targets = match classes {
        Targets::TopK(k) => json!({ "top_k": k }),
        Targets::Classes(ids) => json!({ "classes": ids }),
    };
    json!({
        "method": method.name(),
        "params": params_json(a, spec, method),
        "model": model_json(a, spec),
        "targets": targets,
        "overlay": !a.no_overlay,
    })
}

fn params_json(a: &ExplainArgs, spec: &Spec, method: &Explainer) -> serde_json::Value {
    let mut params = method.params_json();
    if let Some(p) = params.as_object_mut() {
        p.insert(
            "resize".into(),
            json!(a.resize.resize(&spec.preprocess).describe()),
        );
        p.insert("mean".into(), json!(spec.preprocess.mean));
        p.insert("std".into(), json!(spec.preprocess.std));
    }
    params
}

fn model_json(a: &ExplainArgs, spec: &Spec) -> serde_json::Value {
    json!({
        "id": model_name(&a.model),
        "format": spec.format,
        "family": spec.family,
        "architecture": spec.architecture,
        "input_size": [spec.input_size.0, spec.input_size.1],
        "num_classes": spec.num_classes,
    })
}

/// Which classes to explain, resolved before any image is read.
fn resolve_classes(a: &ExplainArgs, spec: &Spec) -> Result<Targets> {
    if let Some(k) = a.top_k {
        if k == 0 || k > spec.num_classes {
            bail!(
                "--top-k {k} out of range; model has {} classes",
                spec.num_classes
            );
        }
        return Ok(Targets::TopK(k));
    }
    let mut ids = Vec::new();
    for c in &a.classes {
        let id = class_id(c, &spec.labels)?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(if ids.is_empty() {
        Targets::TopK(1)
    } else {
        Targets::Classes(ids)
    })
}

/// An image's file stem (`image` for a path without one).
fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// An image decoded and made into the model's input.
struct Loaded {
    /// What the overlay is drawn on: the image as the model saw it (a crop), or the original.
    img: image::RgbImage,
    /// The file's own size.
    original: (u32, u32),
    /// The model input `(3, H, W)`.
    x: Vec<f32>,
    /// Decoding and preprocessing.
    load: Duration,
}

fn load(
    path: &Path,
    pre: &vitcx::model::Preprocess,
    size: (usize, usize),
    resize: vitcx::image::Resize,
) -> Result<Loaded> {
    let t = Instant::now();
    let img = vitcx::image::load_rgb(path)?;
    let original = (img.width(), img.height());
    let (seen, x) = vitcx::image::model_input_with(&img, size, pre.mean, pre.std, resize);
    // A crop explains only what the model saw: draw over that.
    let img = if matches!(resize, vitcx::image::Resize::Stretch) {
        img
    } else {
        seen
    };
    Ok(Loaded {
        img,
        original,
        x,
        load: t.elapsed(),
    })
}

/// A write under way: the image and the thread writing its files, which gives the outcome and
/// the image's seconds (decoding, explaining and writing).
type Writing<'s, 'a> = (
    &'a Image,
    std::thread::ScopedJoinHandle<'s, (Result<(String, Vec<String>)>, Duration)>,
);

/// Waits for an image's files and records the outcome; 1 if it failed.
fn finish((im, handle): Writing, record: &mut vitcx::run::Writer, bars: &Bars) -> Result<usize> {
    let (written, spent) = handle.join().unwrap_or_else(|_| {
        let e = anyhow::anyhow!("writing the files panicked");
        (Err(e), Duration::ZERO)
    });
    match written {
        Ok((line, files)) => {
            record.append(&done_line(im, spent.as_secs_f64(), files))?;
            bars.println(&line);
            bars.images.inc(1);
            Ok(0)
        }
        Err(e) => {
            record_failure(record, bars, im, &e, spent)?;
            Ok(1)
        }
    }
}

/// Records an image's failure in the run record and on the terminal, and counts it done.
fn record_failure(
    record: &mut vitcx::run::Writer,
    bars: &Bars,
    im: &Image,
    e: &anyhow::Error,
    spent: Duration,
) -> Result<()> {
    record.append(&Line::Failed {
        image: im.key.clone(),
        reason: crate::common::one_line(e),
        seconds: spent.as_secs_f64(),
    })?;
    bars.report_failure(&im.path, e);
    bars.images.inc(1);
    Ok(())
}

/// Writes one image's files as one set (all or none): the saliency `.npy` of each class, the
/// overlay and the JSON report. `spent`: the seconds of decoding and explaining.
fn write(
    spec: &Spec,
    a: &ExplainArgs,
    im: &Image,
    (l, ex, described): (&Loaded, &Explanation, &str),
    settings: &serde_json::Value,
    spent: Duration,
) -> Result<(String, Vec<String>)> {
    let (path, stem) = (im.path.as_path(), im.stem.as_str());
    let t = Instant::now();
    let (h, w) = ex.size;
    let mut set = vitcx::io::output::OutputSet::new();
    let mut files = Vec::new();
    for (k, &c) in ex.classes.iter().enumerate() {
        let name = if ex.classes.len() == 1 {
            format!("{stem}.saliency.npy")
        } else {
            format!("{stem}.{c}.saliency.npy")
        };
        set.add_npy(&a.out.join(&name), &[h, w], &ex.saliency[k])?;
        files.push(name);
    }
    let png = if a.no_overlay {
        None
    } else {
        let label = |c: usize| spec.labels.get(c).cloned().unwrap_or_default();
        let c = ex.classes[0];
        let overlay = vitcx::io::render::overlay(&l.img, &ex.saliency[0], (h, w), 0.5)?;
        let lines = vec![
            format!("class {c} {}  p={:.3}", label(c), ex.probs[c]),
            described.to_string(),
        ];
        let picture = vitcx::io::render::with_legend(&overlay, &lines);
        let name = format!("{stem}.png");
        set.add_png(&a.out.join(&name), &picture)?;
        Some(name)
    };
    let write_s = t.elapsed().as_secs_f64();
    let mut report = report(
        spec,
        settings,
        path,
        l.original,
        ex,
        &files,
        png.as_deref(),
        (l.load.as_secs_f64(), write_s),
        spent.as_secs_f64() + write_s,
    );
    report["key"] = json!(im.key);
    report["settings"] = settings.clone();
    let json_name = format!("{stem}.json");
    set.add_json(&a.out.join(&json_name), &report)?;
    set.commit()?;
    let c = ex.classes[0];
    let line = format!(
        "{}: class {c} ({}) p={:.3}, {} -> {}",
        path.display(),
        spec.labels.get(c).map(String::as_str).unwrap_or("?"),
        ex.probs[c],
        described,
        a.out.join(&files[0]).display()
    );
    files.extend(png);
    files.push(json_name);
    Ok((line, files))
}

#[allow(clippy::too_many_arguments)]
fn report(
    spec: &Spec,
    settings: &serde_json::Value,
    path: &Path,
    (iw, ih): (u32, u32),
    ex: &Explanation,
    files: &[String],
    png: Option<&str>,
    (load_s, write_s): (f64, f64),
    total_s: f64,
) -> serde_json::Value {
    let class =
        |c: usize| json!({ "id": c, "label": spec.labels.get(c), "probability": ex.probs[c] });
    let targets: Vec<_> = ex
        .classes
        .iter()
        .zip(files)
        .map(|(&c, f)| {
            let mut v = class(c);
            v["saliency"] = json!(f);
            v
        })
        .collect();
    let mut seconds = serde_json::Map::new();
    seconds.insert("load_image".into(), json!(load_s));
    for (stage, s) in &ex.timings {
        seconds.insert(stage.name().into(), json!(s));
    }
    seconds.insert("write".into(), json!(write_s));
    seconds.insert("total".into(), json!(total_s));
    let mut report = json!({
        "vitcx_version": env!("CARGO_PKG_VERSION"),
        "method": settings["method"],
        "image": path.display().to_string(),
        "image_size": { "width": iw, "height": ih },
        "model": settings["model"],
        "targets": targets,
        "top5": top_k(&ex.probs, 5).into_iter().map(class).collect::<Vec<_>>(),
        "saliency_shape": [ex.size.0, ex.size.1],
        "overlay": png,
        "params": settings["params"],
        "seconds": seconds,
    });
    // The method's own numbers (ViT-CX: n_masks, n_feature_maps) at the top level.
    if let Some(r) = report.as_object_mut() {
        r.extend(ex.stats.clone());
    }
    report
}
