//! One image through one method and the faithfulness metrics: the map, its deletion and
//! insertion curves, and the pointing games where the image has an object mask.

use std::time::Instant;

use super::dataset::{Entry, Input};
use super::metrics::{self, CurveParams};
use crate::error::{Error, Result};
use crate::methods::{Explainer, Progress};
use crate::model::Backbone;
use crate::target::{argmax, Targets};

/// One method's map of one image and its deletion and insertion curves, with the seconds each
/// part took.
#[derive(Debug, Clone)]
pub struct Scored {
    /// The clean probabilities `(C)`.
    pub probs: Vec<f32>,
    /// The explained class (the first of the targets).
    pub class: usize,
    /// The map `(H, W)`.
    pub saliency: Vec<f32>,
    /// Its deletion curve.
    pub deletion: metrics::Curve,
    /// Its insertion curve.
    pub insertion: metrics::Curve,
    /// Seconds to explain.
    pub explain_s: f64,
    /// Seconds for both curves.
    pub curves_s: f64,
}

/// Explains `x` with `explainer` for the first of `targets` and scores that map by deletion and
/// insertion (`index`: the image's position in a data set, for the seeded controls).
pub fn explain_and_score(
    model: &dyn Backbone,
    explainer: &Explainer,
    x: &[f32],
    targets: &Targets,
    index: usize,
    curve: &CurveParams,
    progress: &mut dyn Progress,
) -> Result<Scored> {
    explain_and_score_with(model, explainer, x, None, targets, index, curve, progress)
}

/// [`explain_and_score`] with the image's object-free `background` `(3, H, W)` where the data
/// has one (needed by [`metrics::Baseline::Background`] curves).
#[allow(clippy::too_many_arguments)]
pub fn explain_and_score_with(
    model: &dyn Backbone,
    explainer: &Explainer,
    x: &[f32],
    background: Option<&[f32]>,
    targets: &Targets,
    index: usize,
    curve: &CurveParams,
    progress: &mut dyn Progress,
) -> Result<Scored> {
    let t = Instant::now();
    let mut ex = explainer.explain(model, x, targets, index as u64, progress)?;
    let explain_s = t.elapsed().as_secs_f64();
    let class = ex.classes[0];
    ex.saliency.truncate(1);
    let saliency = ex
        .saliency
        .pop()
        .ok_or_else(|| Error::invalid("the explanation has no saliency map"))?;
    let t = Instant::now();
    let deletion = metrics::deletion_with(model, x, background, &saliency, class, curve)?;
    let insertion = metrics::insertion_with(model, x, background, &saliency, class, curve)?;
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

/// One row of `per_image.csv`: one image explained by one method.
#[derive(Debug, Clone)]
pub struct Row {
    /// The method's name.
    pub method: &'static str,
    /// The image as the manifest names it.
    pub image: String,
    /// The explained class.
    pub class: usize,
    /// `label` (the data's class) or `top1` (the prediction, where the data has none).
    pub class_from: &'static str,
    /// The model's top-1 class.
    pub predicted: usize,
    /// Whether the prediction is the label, where there is one.
    pub correct: Option<bool>,
    /// The deletion curve.
    pub deletion: metrics::Curve,
    /// The insertion curve.
    pub insertion: metrics::Curve,
    /// Pointing game, where there is an object mask.
    pub pointing: Option<bool>,
    /// Pointing game with Zhang et al.'s 15-px tolerance ([`metrics::POINTING_TOLERANCE_PX`]),
    /// where there is an object mask (absent from rows recorded before vitcx computed it).
    pub pointing_tolerant: Option<bool>,
    /// Energy-based pointing game on the raw map, where there is an object mask.
    pub energy: Option<f64>,
    /// Energy-based pointing game on the min-max normalised map (Score-CAM's), where there is
    /// an object mask (absent from rows recorded before vitcx computed it).
    pub energy_minmax: Option<f64>,
    /// Deletion to the object-free image, when asked for ([`Extras::background_curves`]).
    pub deletion_background: Option<metrics::Curve>,
    /// Insertion from the object-free image, when asked for.
    pub insertion_background: Option<metrics::Curve>,
    /// The sanity check's Spearman correlations, one per randomisation step, when asked for
    /// (`super::sanity`).
    pub sanity: Vec<StepScore>,
}

/// One randomisation step's Spearman correlation for one image and method; `None` where it is
/// undefined (a constant map).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepScore {
    /// The step's name ([`super::sanity::Step::name`]).
    pub step: String,
    /// Spearman's rank correlation between the trained model's map and the randomised one's.
    pub spearman: Option<f64>,
}

/// What an evaluation computes beyond the configured curves and the pointing games.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extras {
    /// Also deletion to and insertion from the image without its object (the data must give
    /// one per image), reported beside the configured curves as `deletion_auc_background` and
    /// `insertion_auc_background`.
    pub background_curves: bool,
}

impl Extras {
    /// Whether `curve` or these extras need each image's object-free background.
    pub fn needs_background(&self, curve: &CurveParams) -> bool {
        self.background_curves
            || curve.deletion_baseline == metrics::Baseline::Background
            || curve.insertion_baseline == metrics::Baseline::Background
    }
}

/// A curve as a run record holds it.
#[derive(serde::Deserialize)]
struct CurveJson {
    probs: Vec<f64>,
    x: Vec<f64>,
    auc: f64,
}

impl CurveJson {
    fn of(c: &metrics::Curve) -> serde_json::Value {
        serde_json::json!({
            "probs": c.probs.iter().map(|&p| f64::from(p)).collect::<Vec<_>>(),
            "x": c.x,
            "auc": c.auc,
        })
    }

    fn curve(self) -> metrics::Curve {
        metrics::Curve {
            probs: self.probs.iter().map(|&p| p as f32).collect(),
            x: self.x,
            auc: self.auc,
        }
    }
}

impl Row {
    /// The row as JSON for a run record: every number exactly (curves' `f32` probabilities as
    /// the `f64` they convert to), so that [`Row::from_json`] gives back the same row bit for bit.
    /// Fields vitcx added later are left out where they are empty, so a row without them reads
    /// as before.
    pub fn to_json(&self) -> serde_json::Value {
        let curve = CurveJson::of;
        let mut v = serde_json::json!({
            "method": self.method,
            "image": self.image,
            "class": self.class,
            "class_from": self.class_from,
            "predicted": self.predicted,
            "correct": self.correct,
            "deletion": curve(&self.deletion),
            "insertion": curve(&self.insertion),
            "pointing": self.pointing,
            "energy": self.energy,
        });
        if let Some(p) = self.pointing_tolerant {
            v["pointing_tolerant"] = p.into();
        }
        if let Some(e) = self.energy_minmax {
            v["energy_minmax"] = e.into();
        }
        if let Some(c) = &self.deletion_background {
            v["deletion_background"] = curve(c);
        }
        if let Some(c) = &self.insertion_background {
            v["insertion_background"] = curve(c);
        }
        if !self.sanity.is_empty() {
            v["sanity"] = serde_json::to_value(&self.sanity).unwrap_or_default();
        }
        v
    }

    /// A row from [`Row::to_json`]; the method must be one vitcx knows.
    pub fn from_json(v: &serde_json::Value) -> Result<Row> {
        #[derive(serde::Deserialize)]
        struct RowJson {
            method: String,
            image: String,
            class: usize,
            class_from: String,
            predicted: usize,
            correct: Option<bool>,
            deletion: CurveJson,
            insertion: CurveJson,
            pointing: Option<bool>,
            #[serde(default)]
            pointing_tolerant: Option<bool>,
            energy: Option<f64>,
            #[serde(default)]
            energy_minmax: Option<f64>,
            #[serde(default)]
            deletion_background: Option<CurveJson>,
            #[serde(default)]
            insertion_background: Option<CurveJson>,
            #[serde(default)]
            sanity: Vec<StepScore>,
        }
        let r: RowJson = serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid(format!("a result row does not parse: {e}")))?;
        let curve = CurveJson::curve;
        Ok(Row {
            method: crate::methods::entry(&r.method)?.name,
            image: r.image,
            class: r.class,
            class_from: match r.class_from.as_str() {
                "label" => "label",
                "top1" => "top1",
                other => {
                    return Err(Error::invalid(format!(
                        "a result row's class_from is '{other}'; expected label or top1"
                    )))
                }
            },
            predicted: r.predicted,
            correct: r.correct,
            deletion: curve(r.deletion),
            insertion: curve(r.insertion),
            pointing: r.pointing,
            pointing_tolerant: r.pointing_tolerant,
            energy: r.energy,
            energy_minmax: r.energy_minmax,
            deletion_background: r.deletion_background.map(curve),
            insertion_background: r.insertion_background.map(curve),
            sanity: r.sanity,
        })
    }
}

/// Explains the labelled class of `input` (else the top-1) with `explainer` and scores it.
pub fn evaluate(
    model: &dyn Backbone,
    explainer: &Explainer,
    curve: &CurveParams,
    index: usize,
    entry: &Entry,
    input: &Input,
    progress: &mut dyn Progress,
) -> Result<Row> {
    let extras = Extras::default();
    evaluate_with(
        model, explainer, curve, &extras, index, entry, input, progress,
    )
    .map(|(row, _)| row)
}

/// [`evaluate`] with `extras`, returning the map `(H, W)` too (the sanity check compares it
/// with the maps of randomised models). Curves that need the object-free image fail, with the
/// reason, when `input` has none.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    model: &dyn Backbone,
    explainer: &Explainer,
    curve: &CurveParams,
    extras: &Extras,
    index: usize,
    entry: &Entry,
    input: &Input,
    progress: &mut dyn Progress,
) -> Result<(Row, Vec<f32>)> {
    let targets = match input.truth {
        Some(t) => Targets::Classes(vec![t]),
        None => Targets::TopK(1),
    };
    let background = input.background.as_deref();
    if extras.needs_background(curve) && background.is_none() {
        return Err(Error::invalid(format!(
            "{} has no background (the scene without the object); the background curves need \
             one per image (vitcx synth writes them)",
            entry.image.display()
        )));
    }
    let s = explain_and_score_with(
        model, explainer, &input.x, background, &targets, index, curve, progress,
    )?;
    let (mut deletion_background, mut insertion_background) = (None, None);
    if extras.background_curves {
        let on_background = CurveParams {
            deletion_baseline: metrics::Baseline::Background,
            insertion_baseline: metrics::Baseline::Background,
            ..curve.clone()
        };
        let (x, class) = (&input.x, s.class);
        deletion_background = Some(
            if curve.deletion_baseline == metrics::Baseline::Background {
                s.deletion.clone()
            } else {
                metrics::deletion_with(model, x, background, &s.saliency, class, &on_background)?
            },
        );
        insertion_background = Some(
            if curve.insertion_baseline == metrics::Baseline::Background {
                s.insertion.clone()
            } else {
                metrics::insertion_with(model, x, background, &s.saliency, class, &on_background)?
            },
        );
    }
    let predicted = argmax(&s.probs);
    let mask = input.mask.as_ref();
    let row = Row {
        method: explainer.name(),
        image: entry.image.display().to_string(),
        class: s.class,
        class_from: if input.truth.is_some() {
            "label"
        } else {
            "top1"
        },
        predicted,
        correct: input.truth.map(|t| t == predicted),
        pointing: mask.map(|m| metrics::pointing_game(&s.saliency, m)),
        pointing_tolerant: mask.map(|m| {
            let width = model.spec().input_size.1;
            metrics::pointing_game_within(&s.saliency, m, width, metrics::POINTING_TOLERANCE_PX)
        }),
        energy: mask.map(|m| metrics::energy_pointing_game(&s.saliency, m)),
        energy_minmax: mask.map(|m| metrics::energy_pointing_game_minmax(&s.saliency, m)),
        deletion: s.deletion,
        insertion: s.insertion,
        deletion_background,
        insertion_background,
        sanity: Vec::new(),
    };
    Ok((row, s.saliency))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_json_bit_for_bit() {
        let curve = |k: f32| metrics::Curve {
            probs: vec![0.1 * k, 1.0 / 3.0, f32::MIN_POSITIVE, 0.987_654_3],
            x: vec![0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0],
            auc: 0.1 + 0.2,
        };
        let row = Row {
            method: "vitcx",
            image: "a,b.png".into(),
            class: 3,
            class_from: "label",
            predicted: 2,
            correct: Some(false),
            deletion: curve(1.0),
            insertion: curve(7.0),
            pointing: None,
            pointing_tolerant: Some(true),
            energy: Some(std::f64::consts::PI / 7.0),
            energy_minmax: None,
            deletion_background: None,
            insertion_background: None,
            sanity: Vec::new(),
        };
        let text = serde_json::to_string(&row.to_json()).unwrap();
        // The fields added later are left out when empty: such a row reads as before.
        for key in ["energy_minmax", "deletion_background", "sanity"] {
            assert!(!text.contains(key), "{text}");
        }
        let back = Row::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{row:?}"));
        assert_eq!(back.insertion.probs, row.insertion.probs);
        assert_eq!(
            back.energy.unwrap().to_bits(),
            row.energy.unwrap().to_bits()
        );
        // With every later field.
        let full = Row {
            energy_minmax: Some(1.0 / 3.0),
            deletion_background: Some(curve(3.0)),
            insertion_background: Some(curve(5.0)),
            sanity: vec![
                super::StepScore {
                    step: "head".into(),
                    spearman: Some(0.1 + 0.7),
                },
                super::StepScore {
                    step: "full".into(),
                    spearman: None,
                },
            ],
            ..row.clone()
        };
        let text = serde_json::to_string(&full.to_json()).unwrap();
        let back = Row::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{full:?}"));
        assert_eq!(
            back.insertion_background.as_ref().unwrap().probs,
            full.insertion_background.as_ref().unwrap().probs
        );
        assert_eq!(
            back.sanity[0].spearman.unwrap().to_bits(),
            (0.1f64 + 0.7).to_bits()
        );
        let mut bad = row.to_json();
        bad["method"] = "nope".into();
        assert!(Row::from_json(&bad).is_err());
    }
}
