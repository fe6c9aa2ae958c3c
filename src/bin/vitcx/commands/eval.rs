//! `vitcx eval`: faithfulness of explanations over a data set (deletion/insertion AUC, pointing
//! game, energy pointing game, accuracy), written as a per-image CSV, a JSON summary with 95%
//! confidence intervals, tables and plots of the mean deletion and insertion curves.
//!
//! Each image's rows go into the run record as soon as they are computed, and the report is
//! made from the record: a rerun resumes where a run stopped, and `vitcx merge` makes the same
//! report from the records of several shards.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vitcx::eval::harness::Row;
use vitcx::eval::report::MethodInfo;
use vitcx::eval::{dataset, harness, report, sanity};
use vitcx::run::{Line, Status};
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
    let shard = crate::runs::shard(&a.run)?;
    let mut entries = dataset::read_with(&a.data, a.allow_outside)?;
    if let Some(n) = a.limit {
        entries.truncate(n);
    }
    let keys = crate::inputs::unique(
        entries
            .iter()
            .map(|e| e.image.to_string_lossy().replace('\\', "/")),
        "#",
    );
    let model = load_model(a.model.as_deref(), device)?;
    let model = model.as_ref();
    let extras = harness::Extras {
        background_curves: a.background_curves,
    };
    let sanity = if a.sanity {
        let path = crate::common::model_path(a.model.as_deref())?;
        let r =
            sanity::Randomiser::open(path.as_deref(), a.vitcx.seed, device).context("--sanity")?;
        let steps = r.groups().steps();
        Some((r, steps))
    } else {
        None
    };
    let params = crate::args::method_params(&a.vitcx, &a.other);
    let explainers = methods
        .iter()
        .map(|&m| Explainer::new(m, &params, model))
        .collect::<vitcx::Result<Vec<_>>>()?;
    let infos: Vec<MethodInfo> = explainers.iter().map(MethodInfo::from).collect();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create output directory {}", a.out.display()))?;

    let steps = sanity.as_ref().map(|(_, s)| s.as_slice());
    let settings = run_settings(&a, model.spec(), &infos, &curve, &keys, steps);
    let mine: Vec<usize> = (0..entries.len())
        .filter(|&i| shard.0.contains(&keys[i]))
        .collect();
    let header = crate::runs::header(
        "eval",
        settings,
        shard.clone(),
        mine.iter().map(|&i| keys[i].clone()).collect(),
        entries.len(),
    );
    let (mut record, earlier) = crate::runs::open(&a.out, &header, &a.run, true)?;

    let mut failures = 0usize;
    let mut todo = Vec::new();
    for &i in &mine {
        match earlier.as_ref().and_then(|r| r.status.get(&keys[i])) {
            Some(Status::Done { .. }) => {}
            Some(Status::Failed { reason, .. }) if !a.run.retry_failed => {
                failures += 1;
                eprintln!(
                    "vitcx: {}: failed in an earlier run: {reason}",
                    entries[i].path.display()
                );
            }
            _ => todo.push(i),
        }
    }
    let resumed = mine.len() - todo.len() - failures;
    if resumed > 0 {
        eprintln!(
            "vitcx: {resumed} of {} images already evaluated in {}; resuming",
            mine.len(),
            a.out.display()
        );
    }

    let mut bars = Bars::new((todo.len() * explainers.len()) as u64, a.quiet);
    bars.images.set_prefix("eval");
    let job = Job {
        model,
        explainers: &explainers,
        curve: &curve,
        extras: &extras,
        sanity: sanity.as_ref(),
        device,
    };
    for &index in &todo {
        let e = &entries[index];
        let t = std::time::Instant::now();
        match evaluate_image(&job, index, e, &mut bars) {
            Ok(rows) => {
                let rows: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(row, s)| {
                        let mut v = row.to_json();
                        v["seconds"] = json!(s);
                        v
                    })
                    .collect();
                record.append(&Line::Done {
                    image: keys[index].clone(),
                    seconds: t.elapsed().as_secs_f64(),
                    result: json!({ "index": index, "rows": rows }),
                })?;
            }
            Err(err) => {
                failures += 1;
                record.append(&Line::Failed {
                    image: keys[index].clone(),
                    reason: crate::common::one_line(&err),
                    seconds: t.elapsed().as_secs_f64(),
                })?;
                bars.report_failure(&e.path, &err);
            }
        }
    }
    bars.finish();

    // The report comes from the record: what this run did and what earlier runs did.
    let done = vitcx::run::Record::read(record.path())?;
    let mut results: Vec<_> = done.done().map(|(_, s, r)| (s, r.clone())).collect();
    results.sort_by_key(|(_, r)| r["index"].as_u64());
    let (rows, seconds) = vitcx::run::merge::rows(results.iter().map(|(_, r)| r), &infos)?;
    let mut info = serde_json::Map::new();
    info.insert("model".into(), json!(model_name(&a.model)));
    info.insert("data".into(), json!(a.data.display().to_string()));
    if shard.0.count > 1 {
        info.insert("shard".into(), json!(shard.0.to_string()));
    }
    for key in ["background_curves", "sanity"] {
        if let Some(v) = record_settings(&done, key) {
            info.insert(key.into(), v);
        }
    }
    report::write(&a.out, &infos, &curve, &rows, &seconds, info)?;
    if failures > 0 {
        eprintln!(
            "vitcx: {failures} of {} images failed; results for the others are in {}",
            mine.len(),
            a.out.display()
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// A setting of the run record's header, where the run has it.
fn record_settings(record: &vitcx::run::Record, key: &str) -> Option<serde_json::Value> {
    record.header.settings.get(key).cloned()
}

/// What every image of a run goes through.
struct Job<'a> {
    model: &'a dyn vitcx::model::Backbone,
    explainers: &'a [Explainer],
    curve: &'a vitcx::eval::metrics::CurveParams,
    extras: &'a harness::Extras,
    sanity: Option<&'a (sanity::Randomiser, Vec<sanity::Step>)>,
    device: &'a candle_core::Device,
}

/// Every method on one image: its rows with their seconds, or the first error (an image counts
/// only when every method scored it, so that methods are compared on the same images).
fn evaluate_image(
    job: &Job,
    index: usize,
    e: &dataset::Entry,
    bars: &mut Bars,
) -> Result<Vec<(Row, f64)>> {
    let (model, explainers, curve) = (job.model, job.explainers, job.curve);
    let shown = e.path.display().to_string();
    let name = e
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let load = || -> vitcx::Result<dataset::Input> {
        let mut input = e.load(model.spec())?;
        if job.extras.needs_background(curve) {
            input.background = Some(e.load_background(model.spec())?);
        }
        Ok(input)
    };
    let input = match load() {
        Ok(input) => input,
        Err(err) => {
            bars.images.inc(explainers.len() as u64);
            return Err(err.into());
        }
    };
    let mut rows = Vec::new();
    let mut maps = Vec::new();
    for (k, explainer) in explainers.iter().enumerate() {
        bars.images
            .set_message(format!("{name} ({})", explainer.name()));
        let t = std::time::Instant::now();
        let row =
            harness::evaluate_with(model, explainer, curve, job.extras, index, e, &input, bars);
        bars.images.inc(1);
        let row = match row {
            Ok((row, map)) => {
                maps.push(map);
                row
            }
            Err(err) => {
                bars.images.inc((explainers.len() - k - 1) as u64);
                return Err(anyhow::Error::new(err).context(explainer.name()));
            }
        };
        bars.println(&format!(
            "{shown} [{}]: class {} ({}) deletion {:.4} insertion {:.4}",
            row.method, row.class, row.class_from, row.deletion.auc, row.insertion.auc
        ));
        rows.push((row, t.elapsed().as_secs_f64()));
    }
    if let Some((randomiser, steps)) = job.sanity {
        bars.images.set_message(format!("{name} (sanity check)"));
        let t = std::time::Instant::now();
        let refs: Vec<&Explainer> = explainers.iter().collect();
        let classes: Vec<usize> = rows.iter().map(|(r, _)| r.class).collect();
        let scores = sanity::check_image(
            randomiser, steps, job.device, &refs, &input.x, &classes, &maps, index, bars,
        )
        .context("sanity check")?;
        // The check's time is shared by the methods, in proportion to nothing better known.
        let share = t.elapsed().as_secs_f64() / rows.len().max(1) as f64;
        for ((row, seconds), s) in rows.iter_mut().zip(scores) {
            row.sanity = s;
            *seconds += share;
        }
    }
    Ok(rows)
}

/// Everything that decides the numbers: shards and reruns must agree on all of it.
fn run_settings(
    a: &EvalArgs,
    spec: &vitcx::model::Spec,
    infos: &[MethodInfo],
    curve: &vitcx::eval::metrics::CurveParams,
    keys: &[String],
    sanity_steps: Option<&[sanity::Step]>,
) -> serde_json::Value {
    let params: serde_json::Map<String, serde_json::Value> = infos
        .iter()
        .map(|m| (m.name.to_string(), m.params.clone()))
        .collect();
    let digest = vitcx::run::shard::key_hash(&keys.join("\n"));
    let mut settings = json!({
        "model": {
            "id": model_name(&a.model),
            "format": spec.format,
            "architecture": spec.architecture,
            "num_classes": spec.num_classes,
        },
        "data": a.data.display().to_string(),
        "images": { "count": keys.len(), "digest": format!("{digest:016x}") },
        "methods": infos.iter().map(|m| m.name).collect::<Vec<_>>(),
        "method_params": params,
        "curve": serde_json::to_value(curve).unwrap_or_default(),
    });
    // Only when asked for, so the settings of a run without them stay as they were.
    if a.background_curves {
        settings["background_curves"] = json!(true);
    }
    if let Some(steps) = sanity_steps {
        settings["sanity"] = json!({
            "seed": a.vitcx.seed,
            "steps": steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            "randomisation": sanity::RANDOMISATION,
        });
    }
    settings
}
