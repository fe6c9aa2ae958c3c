//! `vitcx inspect`: what was detected in a checkpoint: family, sizes, token layout and taps,
//! preprocessing, labels, and every value that was assumed rather than read.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::Device;

use crate::args::InspectArgs;
use crate::common::{load_model_at, model_name};

pub fn run(a: InspectArgs, device: &Device) -> Result<ExitCode> {
    let model = load_model_at(a.model.as_deref(), device, a.input_size)?;
    let spec = model.spec();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({ "model": model_name(&a.model), "spec": spec });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let line = |out: &mut std::io::StdoutLock, k: &str, v: String| writeln!(out, "{k:<14} {v}");
    line(&mut out, "model", model_name(&a.model).to_string())?;
    line(&mut out, "format", format!("{:?}", spec.format))?;
    line(
        &mut out,
        "family",
        format!("{} ({})", spec.family, spec.architecture),
    )?;
    line(
        &mut out,
        "input size",
        format!("{} x {}", spec.input_size.0, spec.input_size.1),
    )?;
    line(
        &mut out,
        "depth",
        format!(
            "{} blocks (layers 0..{})",
            spec.depth,
            spec.depth.saturating_sub(1)
        ),
    )?;
    // The token layout as ViT-CX reads it by default: the last layer's tap.
    if let Some(tap) = spec.layer_taps.last().and_then(|t| spec.tap(t).ok()) {
        line(
            &mut out,
            "token grid",
            format!("{} x {}", tap.grid.0, tap.grid.1),
        )?;
        line(&mut out, "width", tap.dim.to_string())?;
        let names = if tap.prefix_tokens.is_empty() {
            "none".to_string()
        } else {
            tap.prefix_tokens.join(", ")
        };
        line(
            &mut out,
            "prefix tokens",
            format!("{} ({names})", tap.prefix_tokens.len()),
        )?;
    }
    for (k, v) in &spec.details {
        if ["dim", "grid", "num_prefix_tokens"].contains(&k.as_str()) {
            continue; // shown above, from the tap
        }
        line(&mut out, &k.replace('_', " "), detail(v))?;
    }
    // Every tap by name (--tap NAME); the token layout once when all taps share it.
    let shape = |t: &vitcx::model::TapInfo| format!("{} x {} x {}", t.grid.0, t.grid.1, t.dim);
    let same = spec.taps.windows(2).all(|w| shape(&w[0]) == shape(&w[1]));
    let names: Vec<String> = spec
        .taps
        .iter()
        .map(|t| {
            if same {
                t.name.clone()
            } else {
                format!("{} ({})", t.name, shape(t))
            }
        })
        .collect();
    let layout = match spec.taps.first() {
        Some(t) if same => format!(", each {}", shape(t)),
        _ => String::new(),
    };
    line(
        &mut out,
        "taps",
        format!(
            "{}{layout}; --layer -1 reads {}",
            spec.taps.len(),
            spec.layer_taps.last().map(String::as_str).unwrap_or("-")
        ),
    )?;
    line(&mut out, "", names.join(", "))?;
    let pre = &spec.preprocess;
    line(&mut out, "mean", format!("{:?}", pre.mean))?;
    line(&mut out, "std", format!("{:?}", pre.std))?;
    let (h, w) = pre.input_size;
    let own = match pre.resize_shortest {
        Some(_) => format!(
            "; the checkpoint's own, with --resize {}",
            crate::args::ResizeArg::Processor.resize(pre).describe()
        ),
        None => String::new(),
    };
    line(
        &mut out,
        "resize",
        format!("stretched to {h} x {w} as the reference{own}"),
    )?;
    if let Some(i) = &pre.interpolation {
        line(
            &mut out,
            "interpolation",
            format!(
                "{i} in the checkpoint's own transform; vitcx resizes bilinear as the reference"
            ),
        )?;
    }
    let labels = &spec.labels;
    let shown: Vec<&str> = labels.iter().take(5).map(String::as_str).collect();
    line(
        &mut out,
        "classes",
        format!(
            "{}: {}{}",
            spec.num_classes,
            shown.join(", "),
            if labels.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ),
    )?;
    for note in &spec.notes {
        line(&mut out, "note", note.clone())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A family detail as text: `[14, 14]` as `14 x 14`, floats in scientific notation when small.
fn detail(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(" x "),
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f != 0.0 && f.abs() < 1e-3 {
                format!("{f:e}")
            } else {
                f.to_string()
            }
        }
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
