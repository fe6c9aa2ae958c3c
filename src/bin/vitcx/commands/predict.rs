//! `vitcx predict`: the top classes of each image, with labels and probabilities.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::Device;

use crate::args::PredictArgs;
use crate::common::load_model_at;

pub fn run(a: PredictArgs, device: &Device) -> Result<ExitCode> {
    let model = load_model_at(a.model.as_deref(), device, a.input_size)?;
    let spec = model.spec().clone();
    let (h, w) = spec.input_size;
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    let mut reports = Vec::new();
    let inputs = crate::inputs::expand(&a.images, a.recursive)?;
    for bad in &inputs.bad {
        eprintln!("vitcx: {bad}");
        failed = true;
    }
    for path in inputs.files {
        let img = match vitcx::image::load_rgb(&path) {
            Ok(img) => img,
            Err(e) => {
                eprintln!("vitcx: {}", crate::common::one_line(&anyhow::Error::new(e)));
                failed = true;
                continue;
            }
        };
        let pre = &spec.preprocess;
        let resize = a.resize.resize(pre);
        let (_, x) = vitcx::image::model_input_with(&img, (h, w), pre.mean, pre.std, resize);
        let px = candle_core::Tensor::from_vec(x, (1, 3, h, w), model.device())?;
        let probs = model.probs(&px)?.flatten_all()?.to_vec1::<f32>()?;
        let top = vitcx::target::top_k(&probs, a.top_k);
        if a.json {
            reports.push(serde_json::json!({
                "image": path.display().to_string(),
                "top": top.iter().map(|&c| serde_json::json!({
                    "class": c, "label": spec.labels.get(c), "probability": probs[c],
                })).collect::<Vec<_>>(),
            }));
        } else {
            writeln!(out, "{}", path.display())?;
            for (rank, &c) in top.iter().enumerate() {
                let label = spec.labels.get(c).map(String::as_str).unwrap_or("?");
                writeln!(out, "  {}. {:>5}  {:.4}  {}", rank + 1, c, probs[c], label)?;
            }
        }
    }
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
    }
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
