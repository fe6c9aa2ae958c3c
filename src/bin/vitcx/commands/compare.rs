//! `vitcx compare`: one image explained by several methods, side by side in one PNG with each
//! map's deletion and insertion AUC under it, plus the numbers as JSON and each map as `.npy`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use vitcx::eval::harness::{explain_and_score, Scored};
use vitcx::target::{class_id, Targets};
use vitcx::Explainer;

use crate::args::CompareArgs;
use crate::common::{load_model, model_name};
use crate::progress::Bars;

pub fn run(a: CompareArgs, device: &candle_core::Device) -> Result<ExitCode> {
    let methods = vitcx::methods::parse_list(&a.methods).context("--methods")?;
    let curve = crate::args::curve_params(&a.curve, a.vitcx.batch)?;
    use vitcx::eval::metrics::Baseline;
    if curve.deletion_baseline == Baseline::Background
        || curve.insertion_baseline == Baseline::Background
    {
        anyhow::bail!(
            "the background baseline needs the image without its object, which compare does not \
             have; use it with vitcx eval on a manifest that lists backgrounds (vitcx synth writes them)"
        );
    }
    let model = load_model(a.model.as_deref(), device)?;
    let model = model.as_ref();
    let spec = model.spec().clone();
    let params = crate::args::method_params(&a.vitcx, &a.other);
    let explainers = methods
        .iter()
        .map(|&m| Explainer::new(m, &params, model))
        .collect::<vitcx::Result<Vec<_>>>()?;
    let targets = match &a.class {
        Some(c) => Targets::Classes(vec![class_id(c, &spec.labels)?]),
        None => Targets::TopK(1),
    };
    let img = vitcx::image::load_rgb(&a.image)?;
    let size = spec.input_size;
    let (resized, x) =
        vitcx::image::model_input(&img, size, spec.preprocess.mean, spec.preprocess.std);
    crate::inputs::refuse_out_holding_inputs(&a.out, std::slice::from_ref(&a.image))?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create output directory {}", a.out.display()))?;
    let stem = a
        .image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());

    let mut bars = Bars::new(explainers.len() as u64, a.quiet);
    bars.images.set_prefix("compare");
    let mut panels = Vec::new();
    let mut entries = Vec::new();
    let mut class_line = None;
    for ex in &explainers {
        bars.images.set_message(ex.name());
        let Scored {
            probs,
            class,
            saliency,
            deletion,
            insertion,
            explain_s,
            curves_s,
        } = explain_and_score(model, ex, &x, &targets, 0, &curve, &mut bars)
            .with_context(|| format!("{} failed", ex.name()))?;
        let npy = format!("{stem}.{}.saliency.npy", ex.name());
        vitcx::io::output::write_npy_atomic(&a.out.join(&npy), &[size.0, size.1], &saliency)?;
        let overlay = vitcx::io::render::overlay(&resized, &saliency, size, 0.5)?;
        panels.push(vitcx::io::render::with_legend(
            &overlay,
            &[
                ex.title().to_string(),
                format!("deletion AUC {:.3}", deletion.auc),
                format!("insertion AUC {:.3}", insertion.auc),
            ],
        ));
        class_line.get_or_insert_with(|| {
            let label = spec.labels.get(class).cloned().unwrap_or_default();
            (class, label, probs[class])
        });
        bars.println(&format!(
            "{}: {} deletion {:.4} insertion {:.4} ({:.2} s)",
            a.image.display(),
            ex.name(),
            deletion.auc,
            insertion.auc,
            explain_s
        ));
        entries.push(json!({
            "method": ex.name(),
            "params": ex.params_json(),
            "deletion_auc": deletion.auc,
            "insertion_auc": insertion.auc,
            "saliency": npy,
            "seconds": { "explain": explain_s, "curves": curves_s },
        }));
        bars.images.inc(1);
    }
    bars.finish();

    let (class, label, p) = class_line.context("no method given")?;
    let first = vitcx::io::render::with_legend(
        &resized,
        &[
            "image".to_string(),
            format!("class {class} {label}"),
            format!("p={p:.3}"),
        ],
    );
    panels.insert(0, first);
    let png = format!("{stem}.compare.png");
    vitcx::io::output::save_png(
        &vitcx::io::render::side_by_side(&panels, 8),
        &a.out.join(&png),
    )?;
    let report = json!({
        "vitcx_version": env!("CARGO_PKG_VERSION"),
        "image": a.image.display().to_string(),
        "model": model_name(&a.model),
        "class": { "id": class, "label": label, "probability": p },
        "methods": entries,
        "curves": curve.report_json(),
        "figure": png,
    });
    vitcx::io::output::write_json_atomic(&a.out.join(format!("{stem}.compare.json")), &report)?;
    eprintln!("vitcx: wrote {}", a.out.join(&png).display());
    Ok(ExitCode::SUCCESS)
}
