//! Every method by name, so that `explain`, `eval` and `compare` treat them alike: ViT-CX,
//! Attention Rollout, RISE, Grad-CAM, and two control maps that a faithful method must beat.
//!
//! A new method is one file implementing [`Method`], one entry in [`METHODS`] and, if it has
//! settings, one field in [`MethodParams`].

use super::controls::{Center, Random};
use super::driver::{explain, Explanation, Method, Progress};
use super::gradcam::{GradCam, GradCamParams};
use super::rise::{Rise, RiseParams};
use super::rollout::{Rollout, RolloutParams};
use super::vitcx::{VitCx, VitCxParams};
use crate::error::{Error, Result};
use crate::model::Backbone;
use crate::target::Targets;

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

/// One method of the registry.
#[derive(Debug)]
pub struct MethodEntry {
    /// The name used on the command line and in reports.
    pub name: &'static str,
    /// The name as people write it in figures.
    pub title: &'static str,
    /// Sets the method up for a model, its settings checked.
    pub new: fn(&MethodParams, &dyn Backbone) -> Result<Box<dyn Method>>,
}

/// Every method, in the order tables list them.
pub static METHODS: &[MethodEntry] = &[
    MethodEntry {
        name: "vitcx",
        title: "ViT-CX",
        new: |p, m| Ok(Box::new(VitCx::new(&p.vitcx, m)?)),
    },
    MethodEntry {
        name: "rollout",
        title: "Rollout",
        new: |p, m| Ok(Box::new(Rollout::for_model(&p.rollout, m)?)),
    },
    MethodEntry {
        name: "rise",
        title: "RISE",
        new: |p, _| Ok(Box::new(Rise::new(&p.rise)?)),
    },
    MethodEntry {
        name: "gradcam",
        title: "Grad-CAM",
        new: |p, m| Ok(Box::new(GradCam::new(&p.gradcam, m)?)),
    },
    MethodEntry {
        name: "random",
        title: "random",
        new: |p, _| Ok(Box::new(Random::new(p.control_seed))),
    },
    MethodEntry {
        name: "center",
        title: "center",
        new: |_, _| Ok(Box::new(Center)),
    },
];

/// The method named `name`; the error lists the supported names.
pub fn entry(name: &str) -> Result<&'static MethodEntry> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<_> = METHODS.iter().map(|m| m.name).collect();
        Error::invalid(format!(
            "unknown method '{name}'; supported methods: {}",
            names.join(", ")
        ))
    })
}

/// Parses a comma-separated list (`vitcx,rollout`), refusing unknown names, duplicates and
/// empty names.
pub fn parse_list(s: &str) -> Result<Vec<&'static MethodEntry>> {
    let mut out: Vec<&'static MethodEntry> = Vec::new();
    for name in s.split(',').map(str::trim) {
        let m = entry(name)?;
        if out.iter().any(|o| o.name == m.name) {
            return Err(Error::invalid(format!("method '{name}' given twice")));
        }
        out.push(m);
    }
    Ok(out)
}

/// A method set up (settings checked) for one model.
#[derive(Debug)]
pub struct Explainer {
    entry: &'static MethodEntry,
    method: Box<dyn Method>,
}

impl Explainer {
    /// Sets up `entry` with its part of `params` for `model`.
    pub fn new(
        entry: &'static MethodEntry,
        params: &MethodParams,
        model: &dyn Backbone,
    ) -> Result<Self> {
        Ok(Explainer {
            entry,
            method: (entry.new)(params, model)?,
        })
    }

    /// Sets up the method named `name` (see [`entry`]).
    pub fn by_name(name: &str, params: &MethodParams, model: &dyn Backbone) -> Result<Self> {
        Self::new(entry(name)?, params, model)
    }

    /// The method's name on the command line and in reports.
    pub fn name(&self) -> &'static str {
        self.entry.name
    }

    /// The method's name in figures.
    pub fn title(&self) -> &'static str {
        self.entry.title
    }

    /// The settings as JSON, for reports.
    pub fn params_json(&self) -> serde_json::Value {
        self.method.params_json()
    }

    /// One line on how `ex` was made, for legends and logs.
    pub fn describe(&self, ex: &Explanation) -> String {
        self.method.describe(ex)
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
        explain(self.method.as_ref(), model, x, targets, index, progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_lists_supported() {
        for m in METHODS {
            assert_eq!(entry(m.name).unwrap().name, m.name);
        }
        let e = entry("lime").unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown method 'lime'; supported methods: vitcx, rollout, rise, gradcam, random, center"
        );
        let names: Vec<&str> = parse_list("vitcx, rise")
            .unwrap()
            .iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, vec!["vitcx", "rise"]);
        assert!(parse_list("vitcx,vitcx").is_err());
        assert!(parse_list("vitcx,").is_err());
    }
}
