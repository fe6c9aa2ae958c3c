//! The explanation methods behind one switch, so `explain`, `eval` and `compare` treat them
//! alike: ViT-CX, Attention Rollout, RISE, Grad-CAM, and two control maps that a faithful
//! method must beat. Each method talks to the model only through [`Backbone`]; a new method is
//! a [`Method`] variant, its settings in [`MethodParams`] and an arm of [`Explainer`].

use candle_core::Tensor;
use serde_json::json;

use crate::error::{Error, Result};
use crate::methods::gradcam::{GradCam, GradCamParams};
use crate::methods::rise::{Rise, RiseParams};
use crate::methods::rollout::{Rollout, RolloutParams};
use crate::methods::vitcx::{
    check_classes, top_k, Explanation, Noise, Progress, Stage, VitCx, VitCxParams,
};
use crate::model::Backbone;

/// Which classes to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// The `k` most probable classes, most probable first.
    TopK(usize),
    /// These class ids, in this order.
    Classes(Vec<usize>),
}

impl Default for Targets {
    /// The top-1 class.
    fn default() -> Self {
        Targets::TopK(1)
    }
}

impl Targets {
    /// The class ids for clean probabilities `probs`; fails on an id out of range or `k = 0`.
    pub fn resolve(&self, probs: &[f32]) -> Result<Vec<usize>> {
        let classes = match self {
            Targets::TopK(k) if *k == 0 || *k > probs.len() => {
                return Err(Error::invalid(format!(
                    "top-{k} out of range; model has {} classes",
                    probs.len()
                )))
            }
            Targets::TopK(k) => top_k(probs, *k),
            Targets::Classes(c) if c.is_empty() => {
                return Err(Error::invalid("no class to explain"))
            }
            Targets::Classes(c) => c.clone(),
        };
        check_classes(&classes, probs.len())?;
        Ok(classes)
    }
}

/// Fails unless `x` holds `3 x H x W` values.
pub fn check_input(x: &[f32], (h, w): (usize, usize)) -> Result<()> {
    if x.len() != 3 * h * w {
        return Err(Error::invalid(format!(
            "input has {} values; expected 3 x {h} x {w} = {}",
            x.len(),
            3 * h * w
        )));
    }
    Ok(())
}

/// `x` `(3, H, W)` checked against the model's input size, as a batch of one on its device.
pub fn input_tensor(model: &dyn Backbone, x: &[f32]) -> Result<Tensor> {
    let (h, w) = model.spec().input_size;
    check_input(x, (h, w))?;
    Ok(Tensor::from_slice(x, (1, 3, h, w), model.device())?)
}

/// Softmax probabilities `(C)` of one image from its logits `(1, C)`.
pub fn probs_of(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(candle_nn::ops::softmax_last_dim(logits)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The model's probabilities `(C)` for one image `px` `(1, 3, H, W)`.
pub fn clean_probs(model: &dyn Backbone, px: &Tensor) -> Result<Vec<f32>> {
    Ok(model.probs(px)?.flatten_all()?.to_vec1::<f32>()?)
}

/// An explanation method, or a control map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// ViT-CX (Xie et al., IJCAI 2023): causal impact of clustered token masks.
    VitCx,
    /// Attention Rollout (Abnar & Zuidema, 2020).
    Rollout,
    /// RISE (Petsiuk et al., 2018): random masks weighted by the class probability.
    Rise,
    /// Grad-CAM (Selvaraju et al., 2017) at ViT-CX's layer.
    GradCam,
    /// Control: independent uniform noise per pixel.
    Random,
    /// Control: a centred Gaussian blob.
    Center,
}

impl Method {
    /// Every method, in the order tables list them.
    pub const ALL: [Method; 6] = [
        Method::VitCx,
        Method::Rollout,
        Method::Rise,
        Method::GradCam,
        Method::Random,
        Method::Center,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::VitCx => "vitcx",
            Method::Rollout => "rollout",
            Method::Rise => "rise",
            Method::GradCam => "gradcam",
            Method::Random => "random",
            Method::Center => "center",
        }
    }

    /// The name as people write it in figures.
    pub fn title(self) -> &'static str {
        match self {
            Method::VitCx => "ViT-CX",
            Method::Rollout => "Rollout",
            Method::Rise => "RISE",
            Method::GradCam => "Grad-CAM",
            Method::Random => "random",
            Method::Center => "center",
        }
    }

    /// Parses a name of [`Method::name`]; the error lists the supported names.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|m| m.name()).collect();
                Error::invalid(format!(
                    "unknown method '{s}'; supported methods: {}",
                    names.join(", ")
                ))
            })
    }

    /// Parses a comma-separated list (`vitcx,rollout`), refusing duplicates and empty names.
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim) {
            let m = Self::parse(name)?;
            if out.contains(&m) {
                return Err(Error::invalid(format!("method '{name}' given twice")));
            }
            out.push(m);
        }
        Ok(out)
    }
}

/// The settings of every method; each method reads its own.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MethodParams {
    /// ViT-CX.
    pub vitcx: VitCxParams,
    /// Attention Rollout.
    pub rollout: RolloutParams,
    /// RISE.
    pub rise: RiseParams,
    /// Grad-CAM.
    pub gradcam: GradCamParams,
    /// Seed of the `random` control map.
    pub control_seed: u64,
}

/// A method set up (settings checked) for one model.
#[derive(Debug, Clone)]
pub enum Explainer {
    /// ViT-CX.
    VitCx(VitCx),
    /// Attention Rollout.
    Rollout(Rollout),
    /// RISE.
    Rise(Rise),
    /// Grad-CAM.
    GradCam(GradCam),
    /// The `random` control with its seed.
    Random(u64),
    /// The `center` control.
    Center,
}

impl Explainer {
    /// Sets up `method` with its part of `params` for `model`.
    pub fn new(method: Method, params: &MethodParams, model: &dyn Backbone) -> Result<Self> {
        Ok(match method {
            Method::VitCx => Explainer::VitCx(VitCx::new(&params.vitcx, model)?),
            Method::Rollout => Explainer::Rollout(Rollout::new(&params.rollout)?),
            Method::Rise => Explainer::Rise(Rise::new(&params.rise)?),
            Method::GradCam => Explainer::GradCam(GradCam::new(&params.gradcam, model)?),
            Method::Random => Explainer::Random(params.control_seed),
            Method::Center => Explainer::Center,
        })
    }

    /// Which method this is.
    pub fn method(&self) -> Method {
        match self {
            Explainer::VitCx(_) => Method::VitCx,
            Explainer::Rollout(_) => Method::Rollout,
            Explainer::Rise(_) => Method::Rise,
            Explainer::GradCam(_) => Method::GradCam,
            Explainer::Random(_) => Method::Random,
            Explainer::Center => Method::Center,
        }
    }

    /// Explains `x` `(3, H, W)` (normalised pixels) for `targets`. `index` is the image's
    /// position in a data set; only the `random` control uses it (its map is seeded per index).
    pub fn explain(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        targets: &Targets,
        index: u64,
        progress: &mut dyn Progress,
    ) -> Result<Explanation> {
        match self {
            Explainer::VitCx(m) => {
                let prepared = m.prepare(model, x, progress)?;
                let classes = targets.resolve(&prepared.probs)?;
                let noise = Noise::Seeded(m.params().params.seed);
                m.score(model, x, prepared, &classes, &noise, progress)
            }
            Explainer::Rollout(m) => m.explain(model, x, targets, progress),
            Explainer::Rise(m) => m.explain(model, x, targets, progress),
            Explainer::GradCam(m) => m.explain(model, x, targets, progress),
            Explainer::Random(seed) => control(model, x, targets, progress, |size| {
                crate::methods::controls::random_map(size, *seed, index)
            }),
            Explainer::Center => control(
                model,
                x,
                targets,
                progress,
                crate::methods::controls::centered_gaussian,
            ),
        }
    }

    /// The settings as JSON, for reports.
    pub fn params_json(&self) -> serde_json::Value {
        match self {
            Explainer::VitCx(m) => {
                let p = &m.params().params;
                json!({
                    "layer": m.params().layer,
                    "layer_arg": p.layer,
                    "tap": "norm1",
                    "threshold": p.threshold,
                    // Through its shortest decimal form, so 0.1f32 reads 0.1 and not 0.10000000149.
                    "noise_std": p.noise_std.to_string().parse::<f64>().unwrap_or(f64::NAN),
                    "seed": p.seed,
                    "batch": p.batch,
                    "precision": p.precision.name(),
                })
            }
            Explainer::Rollout(m) => json!({
                "head_fusion": "mean",
                "discard_ratio": m.params().discard_ratio,
                "rows": "renormalised to sum 1",
            }),
            Explainer::Rise(m) => {
                let p = m.params();
                json!({
                    "masks": p.masks, "cells": p.cells, "p1": p.p1, "seed": p.seed, "batch": p.batch,
                })
            }
            Explainer::GradCam(m) => json!({
                "layer": m.layer(),
                "layer_arg": m.params().layer,
                "tap": "norm1",
                "target": "logit",
            }),
            Explainer::Random(seed) => json!({
                "map": "independent uniform [0, 1) per pixel, ChaCha8 stream = image index",
                "seed": seed,
            }),
            Explainer::Center => json!({
                "map": "Gaussian blob at the image centre, peak 1",
                "sigma_fraction_of_side": crate::methods::controls::CENTER_SIGMA,
            }),
        }
    }
}

/// A control map: one clean forward pass for the probabilities, and `map` for every class.
fn control(
    model: &dyn Backbone,
    x: &[f32],
    targets: &Targets,
    progress: &mut dyn Progress,
    map: impl FnOnce((usize, usize)) -> Vec<f32>,
) -> Result<Explanation> {
    let px = input_tensor(model, x)?;
    let (h, w) = model.spec().input_size;
    progress.start(Stage::Forward, 1);
    let t0 = std::time::Instant::now();
    let probs = clean_probs(model, &px)?;
    let classes = targets.resolve(&probs)?;
    let m = map((h, w));
    progress.advance(1);
    Ok(Explanation {
        probs,
        saliency: vec![m; classes.len()],
        classes,
        size: (h, w),
        n_masks: 0,
        n_feature_maps: 0,
        timings: vec![(Stage::Forward, t0.elapsed().as_secs_f64())],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_lists_supported() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.name()).unwrap(), m);
        }
        let e = Method::parse("lime").unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown method 'lime'; supported methods: vitcx, rollout, rise, gradcam, random, center"
        );
        assert_eq!(
            Method::parse_list("vitcx, rise").unwrap(),
            vec![Method::VitCx, Method::Rise]
        );
        assert!(Method::parse_list("vitcx,vitcx").is_err());
        assert!(Method::parse_list("vitcx,").is_err());
    }

    #[test]
    fn targets_resolve_against_probabilities() {
        let p = [0.1, 0.6, 0.3];
        assert_eq!(Targets::default().resolve(&p).unwrap(), vec![1]);
        assert_eq!(Targets::TopK(2).resolve(&p).unwrap(), vec![1, 2]);
        assert_eq!(Targets::Classes(vec![0]).resolve(&p).unwrap(), vec![0]);
        assert!(Targets::TopK(4).resolve(&p).is_err());
        assert!(Targets::TopK(0).resolve(&p).is_err());
        assert!(Targets::Classes(vec![3]).resolve(&p).is_err());
        assert!(Targets::Classes(vec![]).resolve(&p).is_err());
    }
}
