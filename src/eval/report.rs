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

/// What a report says about a method: its name, title and parameters (from an [`Explainer`],
/// or from a run record when shards are merged).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodInfo {
    /// The registry name (`vitcx`).
    pub name: &'static str,
    /// The title in tables (`ViT-CX`).
    pub title: &'static str,
    /// The parameters, as the method reports them.
    pub params: serde_json::Value,
}

impl From<&Explainer> for MethodInfo {
    fn from(e: &Explainer) -> Self {
        MethodInfo {
            name: e.name(),
            title: e.title(),
            params: e.params_json(),
        }
    }
}

impl MethodInfo {
    /// The method called `name` with these parameters (a merge reads them from a record).
    pub fn named(name: &str, params: serde_json::Value) -> Result<Self> {
        let e = crate::methods::entry(name)?;
        Ok(MethodInfo {
            name: e.name,
            title: e.title,
            params,
        })
    }
}

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
    let auc = |c: &Option<metrics::Curve>| c.as_ref().map(|c| c.auc);
    let columns: [(&str, Vec<f64>); 9] = [
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
            "pointing_game_15px",
            rows.iter()
                .filter_map(|r| r.pointing_tolerant.map(flag))
                .collect(),
        ),
        (
            "energy_pointing_game",
            rows.iter().filter_map(|r| r.energy).collect(),
        ),
        (
            "energy_pointing_game_minmax",
            rows.iter().filter_map(|r| r.energy_minmax).collect(),
        ),
        (
            "deletion_auc_background",
            rows.iter()
                .filter_map(|r| auc(&r.deletion_background))
                .collect(),
        ),
        (
            "insertion_auc_background",
            rows.iter()
                .filter_map(|r| auc(&r.insertion_background))
                .collect(),
        ),
        (
            "accuracy",
            rows.iter().filter_map(|r| r.correct.map(flag)).collect(),
        ),
    ];
    columns
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(name, v)| {
            // Shares of hits get an interval that stays inside [0, 1].
            let share = matches!(name, "pointing_game" | "pointing_game_15px" | "accuracy");
            let summary = if share {
                metrics::summarize_share(&v)
            } else {
                metrics::summarize(&v)
            };
            (name, summary)
        })
        .collect()
}

/// The metrics in table order, with the direction that is better. `energy_pointing_game`
/// scores the map as it is (the share of its positive mass on the object), as vitcx always
/// has; `energy_pointing_game_minmax` scores it min-max normalised first, as Score-CAM does.
/// The two `_background` curves exist only where the evaluation ran them
/// ([`super::harness::Extras::background_curves`]).
pub const METRICS: [(&str, &str); 9] = [
    ("deletion_auc", "lower is better"),
    ("insertion_auc", "higher is better"),
    (
        "pointing_game",
        "higher is better; the maximum on an object pixel",
    ),
    (
        "pointing_game_15px",
        "higher is better; the maximum within 15 px of the object (Zhang et al. 2016)",
    ),
    ("energy_pointing_game", "higher is better; raw map"),
    (
        "energy_pointing_game_minmax",
        "higher is better; min-max normalised map (Score-CAM)",
    ),
    (
        "deletion_auc_background",
        "lower is better; deletion to the image without its object",
    ),
    (
        "insertion_auc_background",
        "higher is better; insertion from the image without its object",
    ),
    ("accuracy", "of the model"),
];

/// Whether the rows hold the curves against the object-free image.
fn has_background_curves(rows: &[Row]) -> bool {
    rows.iter()
        .any(|r| r.deletion_background.is_some() || r.insertion_background.is_some())
}

/// Writes an evaluation's results into `out`: `per_image.csv`, `summary.json` (each method's
/// metrics with 95% intervals, and the settings), `table.csv`, `table.md` and the mean
/// `deletion.png` / `insertion.png` curves, one line per method. `seconds[k]` is the time
/// method `k` took over all its images; `settings` (model, data) goes into the summary.
pub fn write(
    out: &Path,
    explainers: &[MethodInfo],
    curve: &CurveParams,
    rows: &[Row],
    seconds: &[f64],
    settings: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let background = has_background_curves(rows);
    let mut csv = String::from(
        "method,image,class,class_from,predicted,correct,deletion_auc,insertion_auc,pointing_game,pointing_game_15px,energy_pointing_game,energy_pointing_game_minmax",
    );
    if background {
        csv.push_str(",deletion_auc_background,insertion_auc_background");
    }
    csv.push('\n');
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            r.method,
            csv_field(&r.image),
            r.class,
            r.class_from,
            r.predicted,
            opt(r.correct.map(|c| c.to_string())),
            r.deletion.auc,
            r.insertion.auc,
            opt(r.pointing.map(|c| c.to_string())),
            opt(r.pointing_tolerant.map(|c| c.to_string())),
            opt(r.energy.map(|c| c.to_string())),
            opt(r.energy_minmax.map(|c| c.to_string())),
        ));
        if background {
            let auc = |c: &Option<metrics::Curve>| opt(c.as_ref().map(|c| c.auc.to_string()));
            csv.push_str(&format!(
                ",{},{}",
                auc(&r.deletion_background),
                auc(&r.insertion_background)
            ));
        }
        csv.push('\n');
    }
    write_atomic(&out.join("per_image.csv"), csv.as_bytes())?;

    let mut report = serde_json::Map::new();
    let mut table_csv = String::from("method,metric,mean,ci95_low,ci95_high,n\n");
    let mut md = String::from(
        "| method | deletion AUC ↓ | insertion AUC ↑ | pointing game ↑ | pointing, 15 px ↑ | energy pointing game ↑ | energy, min-max ↑ |",
    );
    if background {
        md.push_str(" deletion AUC, background ↓ | insertion AUC, background ↑ |");
    }
    md.push_str(" s per image |\n|---|---|---|---|---|---|---|");
    if background {
        md.push_str("---|---|");
    }
    md.push_str("---|\n");
    let mut params = serde_json::Map::new();
    let mut cost = serde_json::Map::new();
    // The model's accuracy, the same for every method; reported once, from the first.
    let mut accuracy = None;
    for (k, ex) in explainers.iter().enumerate() {
        let method = ex.name;
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
        params.insert(method.into(), ex.params.clone());
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
            "| {} | {} | {} | {} | {} | {} | {} |",
            ex.title,
            cell("deletion_auc"),
            cell("insertion_auc"),
            cell("pointing_game"),
            cell("pointing_game_15px"),
            cell("energy_pointing_game"),
            cell("energy_pointing_game_minmax"),
        ));
        if background {
            md.push_str(&format!(
                " {} | {} |",
                cell("deletion_auc_background"),
                cell("insertion_auc_background")
            ));
        }
        md.push_str(&format!(" {per_image:.2} |\n"));
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
    if background {
        md.push_str(
            "The background columns are deletion to, and insertion from, the same image without its object (the true absence of the object).\n",
        );
    }
    if rows.iter().any(|r| !r.sanity.is_empty()) {
        md.push_str(
            "Seconds per image include the sanity check (sanity.md), shared equally by the methods.\n",
        );
    }
    let names: Vec<&str> = explainers.iter().map(|e| e.name).collect();
    let listed: Vec<serde_json::Value> = METRICS
        .iter()
        .filter(|(m, _)| background || !m.ends_with("_background"))
        .map(|(m, d)| json!({"name": m, "note": d}))
        .collect();
    let mut all = json!({
        "methods": names,
        "method_params": params,
        "seconds_per_image": cost,
        "images": images.len(),
        "explained_class": "the label where the data gives one, else the top-1 prediction",
        "ci95": "mean +- t(0.975, n-1) * sd / sqrt(n); [mean, mean] for n = 1",
        "metrics": listed,
        "vitcx_version": env!("CARGO_PKG_VERSION"),
    });
    if let (Some(s), serde_json::Value::Object(c)) = (all.as_object_mut(), curve.report_json()) {
        s.extend(settings);
        s.extend(c);
    }
    if let Some(sanity) = write_sanity(out, explainers, rows)? {
        report.insert("sanity".into(), sanity);
    }
    report.insert("settings".into(), all);
    write_json_atomic(
        &out.join("summary.json"),
        &serde_json::Value::Object(report),
    )?;
    write_atomic(&out.join("table.csv"), table_csv.as_bytes())?;
    write_atomic(&out.join("table.md"), md.as_bytes())?;

    type Pick = fn(&Row) -> Option<&metrics::Curve>;
    let mut plots: Vec<(&str, Pick)> = vec![
        ("deletion", |r: &Row| Some(&r.deletion)),
        ("insertion", |r: &Row| Some(&r.insertion)),
    ];
    if background {
        plots.push(("deletion_background", |r: &Row| {
            r.deletion_background.as_ref()
        }));
        plots.push(("insertion_background", |r: &Row| {
            r.insertion_background.as_ref()
        }));
    }
    for (name, pick) in plots {
        let mut series = Vec::new();
        let mut x = Vec::new();
        for ex in explainers {
            let method = ex.name;
            let mine: Vec<&metrics::Curve> = rows
                .iter()
                .filter(|r| r.method == method)
                .filter_map(pick)
                .collect();
            let Some(first) = mine.first() else { continue };
            x = first.x.clone();
            let mut mean = vec![0f64; x.len()];
            for r in &mine {
                for (m, &p) in mean.iter_mut().zip(&r.probs) {
                    *m += f64::from(p) / mine.len() as f64;
                }
            }
            let mean: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
            let label = format!("{} AUC={:.3}", ex.title, metrics::auc(&x, &mean));
            series.push((label, mean));
        }
        if series.is_empty() {
            continue;
        }
        let what = match name {
            "deletion_background" => "deletion to the image without its object",
            "insertion_background" => "insertion from the image without its object",
            other => other,
        };
        let title = format!("{what}, mean over {} images", images.len());
        let img = plot_curves(&x, &series, &title, "fraction of pixels", "probability");
        save_png(&img, &out.join(format!("{name}.png")))?;
    }
    Ok(())
}

/// The sanity check's part of an evaluation's report (`super::sanity`), where `rows` hold its
/// scores:
/// `sanity.csv` (each method and step: mean Spearman correlation, 95% interval, n),
/// `sanity.md` (one row per step, one column per method) and `sanity_per_image.csv`; returns
/// what `summary.json` gets under `sanity`, or `None` (and writes nothing) without scores.
/// Undefined correlations (a constant map) are left out of the means and counted apart.
fn write_sanity(
    out: &Path,
    methods: &[MethodInfo],
    rows: &[Row],
) -> Result<Option<serde_json::Value>> {
    let mut steps: Vec<&str> = Vec::new();
    for r in rows {
        for s in &r.sanity {
            if !steps.contains(&s.step.as_str()) {
                steps.push(&s.step);
            }
        }
    }
    if steps.is_empty() {
        return Ok(None);
    }
    let mut per_image = String::from("method,image,step,spearman\n");
    for r in rows {
        for s in &r.sanity {
            per_image.push_str(&format!(
                "{},{},{},{}\n",
                r.method,
                csv_field(&r.image),
                s.step,
                s.spearman.map(|v| v.to_string()).unwrap_or_default()
            ));
        }
    }
    let mut csv = String::from("method,step,mean,ci95_low,ci95_high,n,undefined\n");
    let mut by_method = serde_json::Map::new();
    let mut cells: Vec<Vec<String>> = vec![Vec::new(); steps.len()];
    for m in methods {
        let mut per_step = serde_json::Map::new();
        for (k, step) in steps.iter().enumerate() {
            let scores = rows
                .iter()
                .filter(|r| r.method == m.name)
                .flat_map(|r| r.sanity.iter().filter(|s| s.step == *step));
            let (mut values, mut undefined) = (Vec::new(), 0usize);
            for s in scores {
                match s.spearman {
                    Some(v) => values.push(v),
                    None => undefined += 1,
                }
            }
            let sum = metrics::summarize(&values);
            csv.push_str(&format!(
                "{},{step},{},{},{},{},{undefined}\n",
                m.name, sum.mean, sum.ci95[0], sum.ci95[1], sum.n
            ));
            per_step.insert(
                (*step).to_string(),
                serde_json::json!({
                    "mean": sum.mean, "ci95": sum.ci95, "n": sum.n, "undefined": undefined,
                }),
            );
            cells[k].push(if sum.n > 0 {
                format!("{:.3} [{:.3}, {:.3}]", sum.mean, sum.ci95[0], sum.ci95[1])
            } else {
                "–".into()
            });
        }
        by_method.insert(m.name.into(), serde_json::Value::Object(per_step));
    }
    let titles: Vec<&str> = methods.iter().map(|m| m.title).collect();
    let mut md = format!(
        "| randomised | {} |\n|---|{}\n",
        titles.join(" | "),
        "---|".repeat(titles.len())
    );
    for (step, row) in steps.iter().zip(&cells) {
        md.push_str(&format!("| {} | {} |\n", describe(step), row.join(" | ")));
    }
    md.push_str(
        "\nSpearman rank correlation between the trained model's map and the map of the same \
         architecture with the weights named randomised (cascading from the head down, then every \
         weight); mean [95% interval] over the images. Near 1: the map does not depend on what \
         the model learned (Adebayo et al., NeurIPS 2018).\n",
    );
    write_atomic(&out.join("sanity.csv"), csv.as_bytes())?;
    write_atomic(&out.join("sanity.md"), md.as_bytes())?;
    write_atomic(&out.join("sanity_per_image.csv"), per_image.as_bytes())?;
    Ok(Some(serde_json::json!({
        "metric": "Spearman rank correlation between the trained and the randomised model's maps (ties by mean rank)",
        "steps": steps,
                "methods": by_method,
    })))
}

/// A step's name in words, for the table.
fn describe(step: &str) -> String {
    match step {
        "head" => "head".into(),
        "full" => "every weight".into(),
        other => match other
            .strip_prefix("head+")
            .and_then(|k| k.parse::<usize>().ok())
        {
            Some(1) => "head + last block".into(),
            Some(k) => format!("head + last {k} blocks"),
            None => other.into(),
        },
    }
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
