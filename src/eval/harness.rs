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
    let deletion = metrics::deletion(model, x, &saliency, class, curve)?;
    let insertion = metrics::insertion(model, x, &saliency, class, curve)?;
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
    /// Energy-based pointing game, where there is an object mask.
    pub energy: Option<f64>,
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
    let targets = match input.truth {
        Some(t) => Targets::Classes(vec![t]),
        None => Targets::TopK(1),
    };
    let s = explain_and_score(model, explainer, &input.x, &targets, index, curve, progress)?;
    let predicted = argmax(&s.probs);
    let mask = input.mask.as_ref();
    Ok(Row {
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
        energy: mask.map(|m| metrics::energy_pointing_game(&s.saliency, m)),
        deletion: s.deletion,
        insertion: s.insertion,
    })
}
