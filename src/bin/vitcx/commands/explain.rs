//! `vitcx explain`: images in, saliency `.npy`, PNG overlay and JSON report out.

use std::collections::HashSet;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vitcx::model::{Backbone, Precision, Spec};
use vitcx::target::{class_id, top_k, Targets};
use vitcx::{Explainer, Explanation};

use crate::args::ExplainArgs;
use crate::common::{load_model_at, model_name};
use crate::progress::Bars;

pub fn run(a: ExplainArgs, device: &candle_core::Device) -> Result<ExitCode> {
    let entry = vitcx::methods::entry(&a.method).context("--method")?;
    let model = load_model_at(a.model.as_deref(), device, a.input_size)?;
    let model = model.as_ref();
    let params = crate::args::method_params(&a.vitcx, &a.other);
    let method = Explainer::new(entry, &params, model)?;
    let spec = model.spec().clone();
    let classes = resolve_classes(&a, &spec)?;
    let inputs = crate::inputs::expand(&a.images, a.recursive)?;
    let images = inputs.files;
    if a.vitcx.precision == Precision::Bf16 && device.is_cpu() && !Precision::bf16_is_native() {
        eprintln!(
            "vitcx: --precision bf16: this CPU has no bf16 dot product (AVX512-BF16), so the bf16 \
             passes run about as fast as f32 ({})",
            Precision::bf16_kernel()
        );
    }
    crate::inputs::refuse_out_holding_inputs(&a.out, &images)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create output directory {}", a.out.display()))?;

    let mut bars = Bars::new(images.len() as u64, a.quiet);
    let mut used_stems = HashSet::new();
    // An argument that names no file is that entry's failure; the others still run.
    let mut failures = inputs.bad.len();
    for bad in &inputs.bad {
        bars.println(&format!("vitcx: {bad}"));
    }
    for path in &images {
        bars.images.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let stem = unique_stem(path, &mut used_stems);
        match explain_one(model, &spec, &method, &a, &classes, path, &stem, &mut bars) {
            Ok(line) => bars.println(&line),
            Err(e) => {
                failures += 1;
                bars.report_failure(path, &e);
            }
        }
        bars.images.inc(1);
    }
    bars.finish();
    if failures > 0 {
        eprintln!(
            "vitcx: {failures} of {} images failed; results for the others are in {}",
            images.len() + inputs.bad.len(),
            a.out.display()
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
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

/// The file stem for an image, made unique within this run (`a.png`, `b/a.png` -> `a`, `a-2`).
fn unique_stem(path: &Path, used: &mut HashSet<String>) -> String {
    let base = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let mut stem = base.clone();
    let mut k = 2;
    while !used.insert(stem.clone()) {
        stem = format!("{base}-{k}");
        k += 1;
    }
    stem
}

#[allow(clippy::too_many_arguments)]
fn explain_one(
    model: &dyn Backbone,
    spec: &Spec,
    method: &Explainer,
    a: &ExplainArgs,
    classes: &Targets,
    path: &Path,
    stem: &str,
    bars: &mut Bars,
) -> Result<String> {
    let started = Instant::now();
    let t = Instant::now();
    let img = vitcx::image::load_rgb(path)?;
    let pre = &spec.preprocess;
    let original = (img.width(), img.height());
    let resize = a.resize.resize(pre);
    let (seen, x) =
        vitcx::image::model_input_with(&img, spec.input_size, pre.mean, pre.std, resize);
    // A crop explains only what the model saw: draw over that.
    let img = if matches!(resize, vitcx::image::Resize::Stretch) {
        img
    } else {
        seen
    };
    let load_s = t.elapsed().as_secs_f64();

    let ex = method.explain(model, &x, classes, 0, bars)?;

    // Everything is computed: now write the image's files as one set (all or none).
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
        let overlay = vitcx::io::render::overlay(&img, &ex.saliency[0], (h, w), 0.5)?;
        let lines = vec![
            format!("class {c} {}  p={:.3}", label(c), ex.probs[c]),
            method.describe(&ex),
        ];
        let picture = vitcx::io::render::with_legend(&overlay, &lines);
        let name = format!("{stem}.png");
        set.add_png(&a.out.join(&name), &picture)?;
        Some(name)
    };
    let write_s = t.elapsed().as_secs_f64();
    let report = report(
        a,
        spec,
        method,
        path,
        original,
        &ex,
        &files,
        png.as_deref(),
        load_s,
        write_s,
        started.elapsed().as_secs_f64(),
    );
    set.add_json(&a.out.join(format!("{stem}.json")), &report)?;
    set.commit()?;
    let c = ex.classes[0];
    Ok(format!(
        "{}: class {c} ({}) p={:.3}, {} -> {}",
        path.display(),
        spec.labels.get(c).map(String::as_str).unwrap_or("?"),
        ex.probs[c],
        method.describe(&ex),
        a.out.join(&files[0]).display()
    ))
}

#[allow(clippy::too_many_arguments)]
fn report(
    a: &ExplainArgs,
    spec: &Spec,
    method: &Explainer,
    path: &Path,
    (iw, ih): (u32, u32),
    ex: &Explanation,
    files: &[String],
    png: Option<&str>,
    load_s: f64,
    write_s: f64,
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
    let mut params = method.params_json();
    if let Some(p) = params.as_object_mut() {
        p.insert(
            "resize".into(),
            json!(a.resize.resize(&spec.preprocess).describe()),
        );
        p.insert("mean".into(), json!(spec.preprocess.mean));
        p.insert("std".into(), json!(spec.preprocess.std));
    }
    let mut report = json!({
        "vitcx_version": env!("CARGO_PKG_VERSION"),
        "method": method.name(),
        "image": path.display().to_string(),
        "image_size": { "width": iw, "height": ih },
        "model": {
            "id": model_name(&a.model),
            "format": spec.format,
            "family": spec.family,
            "architecture": spec.architecture,
            "input_size": [spec.input_size.0, spec.input_size.1],
            "num_classes": spec.num_classes,
        },
        "targets": targets,
        "top5": top_k(&ex.probs, 5).into_iter().map(class).collect::<Vec<_>>(),
        "saliency_shape": [ex.size.0, ex.size.1],
        "overlay": png,
        "params": params,
        "seconds": seconds,
    });
    // The method's own numbers (ViT-CX: n_masks, n_feature_maps) at the top level.
    if let Some(r) = report.as_object_mut() {
        r.extend(ex.stats.clone());
    }
    report
}
