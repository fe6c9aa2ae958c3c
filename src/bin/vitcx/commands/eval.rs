//! `vitcx eval`: faithfulness of explanations over a data set (deletion/insertion AUC, pointing
//! game, energy pointing game, accuracy), written as a per-image CSV, a JSON summary with 95%
//! confidence intervals, tables and plots of the mean deletion and insertion curves.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vitcx::eval::{dataset, harness, report};
use vitcx::Explainer;

use crate::args::EvalArgs;
use crate::common::{load_model, model_name};
use crate::progress::Bars;

pub fn run(a: EvalArgs, device: &candle_core::Device) -> Result<ExitCode> {
    let methods = vitcx::methods::parse_list(&a.methods).context("--methods")?;
    let curve = crate::args::curve_params(&a.curve, a.vitcx.batch)?;
    if matches!(a.limit, Some(0)) {
        bail!("--limit 0; expected at least 1 image");
    }
    let mut entries = dataset::read_with(&a.data, a.allow_outside)?;
    if let Some(n) = a.limit {
        entries.truncate(n);
    }
    let model = load_model(a.model.as_deref(), device)?;
    let model = model.as_ref();
    let params = crate::args::method_params(&a.vitcx, &a.other);
    let explainers = methods
        .iter()
        .map(|&m| Explainer::new(m, &params, model))
        .collect::<vitcx::Result<Vec<_>>>()?;
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
        let input = match e.load(model.spec()) {
            Ok(input) => input,
            Err(err) => {
                failures += 1;
                bars.report_failure(&e.path, &err.into());
                bars.images.inc(explainers.len() as u64);
                continue;
            }
        };
        for (k, explainer) in explainers.iter().enumerate() {
            bars.images
                .set_message(format!("{name} ({})", explainer.name()));
            let t = std::time::Instant::now();
            match harness::evaluate(model, explainer, &curve, index, e, &input, &mut bars) {
                Ok(row) => {
                    seconds[k] += t.elapsed().as_secs_f64();
                    bars.println(&format!(
                        "{shown} [{}]: class {} ({}) deletion {:.4} insertion {:.4}",
                        row.method, row.class, row.class_from, row.deletion.auc, row.insertion.auc
                    ));
                    rows.push(row);
                }
                Err(err) => {
                    failures += 1;
                    bars.report_failure(
                        &e.path,
                        &anyhow::Error::new(err).context(explainer.name()),
                    );
                }
            }
            bars.images.inc(1);
        }
    }
    bars.finish();

    let mut settings = serde_json::Map::new();
    settings.insert("model".into(), json!(model_name(&a.model)));
    settings.insert("data".into(), json!(a.data.display().to_string()));
    report::write(&a.out, &explainers, &curve, &rows, &seconds, settings)?;
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
