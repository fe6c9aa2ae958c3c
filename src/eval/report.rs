//! The files of an evaluation: per-image rows, per-method summaries with 95% intervals, one
//! table of every method, and plots of the mean curves.

use std::path::Path;

use serde_json::json;

use super::harness::Row;
use super::metrics::{self, CurveParams};
use crate::error::Result;
use crate::io::output::{save_png, write_atomic, write_json_atomic};
use crate::io::plot::plot_curves;
use crate::methods::Explainer;

/// A CSV field, quoted where it needs to be.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The metrics of each method, in the order of [`METRICS`], where they exist.
pub fn summaries(rows: &[Row], method: &str) -> Vec<(&'static str, metrics::Summary)> {
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
pub const METRICS: [(&str, &str); 5] = [
    ("deletion_auc", "lower is better"),
    ("insertion_auc", "higher is better"),
    ("pointing_game", "higher is better"),
    ("energy_pointing_game", "higher is better"),
    ("accuracy", "of the model"),
];

/// Writes an evaluation's results into `out`: `per_image.csv`, `summary.json` (each method's
/// metrics with 95% intervals, and the settings), `table.csv`, `table.md` and the mean
/// `deletion.png` / `insertion.png` curves, one line per method. `seconds[k]` is the time
/// method `k` took over all its images; `settings` (model, data) goes into the summary.
pub fn write(
    out: &Path,
    explainers: &[Explainer],
    curve: &CurveParams,
    rows: &[Row],
    seconds: &[f64],
    settings: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let mut csv = String::from(
        "method,image,class,class_from,predicted,correct,deletion_auc,insertion_auc,pointing_game,energy_pointing_game\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            r.method,
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
    write_atomic(&out.join("per_image.csv"), csv.as_bytes())?;

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
        let method = ex.name();
        let sums = summaries(rows, method);
        if k == 0 {
            accuracy = sums.iter().find(|(n, _)| *n == "accuracy").map(|(_, s)| *s);
        }
        let mut m = serde_json::Map::new();
        for (name, s) in &sums {
            m.insert(
                (*name).into(),
                json!({ "mean": s.mean, "ci95": s.ci95, "n": s.n }),
            );
            table_csv.push_str(&format!(
                "{},{name},{},{},{},{}\n",
                method, s.mean, s.ci95[0], s.ci95[1], s.n
            ));
        }
        report.insert(method.into(), serde_json::Value::Object(m));
        params.insert(method.into(), ex.params_json());
        let n = rows.iter().filter(|r| r.method == method).count();
        let per_image = if n > 0 {
            seconds[k] / n as f64
        } else {
            f64::NAN
        };
        cost.insert(method.into(), json!(per_image));
        let cell = |metric: &str| {
            sums.iter()
                .find(|(name, _)| *name == metric)
                .map(|(_, s)| format!("{:.3} [{:.3}, {:.3}]", s.mean, s.ci95[0], s.ci95[1]))
                .unwrap_or_else(|| "–".into())
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} |\n",
            ex.title(),
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
    let names: Vec<&str> = explainers.iter().map(|e| e.name()).collect();
    let mut all = json!({
        "methods": names,
        "method_params": params,
        "seconds_per_image": cost,
        "images": images.len(),
        "explained_class": "the label where the data gives one, else the top-1 prediction",
        "ci95": "mean +- t(0.975, n-1) * sd / sqrt(n); [mean, mean] for n = 1",
        "metrics": METRICS.iter().map(|(m, d)| json!({"name": m, "note": d})).collect::<Vec<_>>(),
        "vitcx_version": env!("CARGO_PKG_VERSION"),
    });
    if let (Some(s), serde_json::Value::Object(c)) = (all.as_object_mut(), curve.report_json()) {
        s.extend(settings);
        s.extend(c);
    }
    report.insert("settings".into(), all);
    write_json_atomic(
        &out.join("summary.json"),
        &serde_json::Value::Object(report),
    )?;
    write_atomic(&out.join("table.csv"), table_csv.as_bytes())?;
    write_atomic(&out.join("table.md"), md.as_bytes())?;

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
            let method = ex.name();
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
            let label = format!("{} AUC={:.3}", ex.title(), metrics::auc(&x, &mean));
            series.push((label, mean));
        }
        if series.is_empty() {
            continue;
        }
        let title = format!("{name}, mean over {} images", images.len());
        let img = plot_curves(&x, &series, &title, "fraction of pixels", "probability");
        save_png(&img, &out.join(format!("{name}.png")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a.png"), "a.png");
        assert_eq!(csv_field("a,b \"c\".png"), "\"a,b \"\"c\"\".png\"");
    }
}
