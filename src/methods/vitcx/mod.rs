//! ViT-CX, the explanation method: feature maps -> masks -> clusters -> causal scores -> saliency.
//!
//! Xie, Li, Cao, Zhang, "ViT-CX: Causal Explanation of Vision Transformers", IJCAI 2023
//! (<https://arxiv.org/abs/2211.03064>). The steps and their corner cases follow
//! docs/algorithm.md §1-5, which restates the reference implementation; §9 lists where vitcx
//! departs from it on purpose (distances in the token-grid space, seeded noise, no noisy
//! originals at sigma 0, zero instead of NaN for constant maps and uncovered pixels).
//!
//! The stages: [`mask`] (feature maps to masks, distances), [`cluster`] (complete linkage),
//! [`score`] (causal scores, coverage correction); this module wires them into the driver.

pub mod cluster;
pub mod mask;
pub mod score;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::json;

use self::cluster::{complete_linkage, Clustering};
use self::mask::{cosine_distances, merged_masks, Masks};
use self::score::saliency;
use super::driver::{explain, Clean, CleanPass, Explanation, Maps, Method, Progress, Run, Stage};
use crate::error::{Error, Result};
use crate::model::{Backbone, Precision, Spec};
use crate::target::{check_classes, Targets};

/// Similarities of the masks (docs/algorithm.md §3.1).
pub const SIMILARITY: Stage = Stage("similarity");
/// Agglomerative clustering and merging (§3.2-3.3).
pub const CLUSTERING: Stage = Stage("clustering");

/// The largest `--noise-std` (normalised pixel units).
pub const MAX_NOISE_STD: f32 = 10.0;

/// ViT-CX parameters. Build with [`VitCxParams::default`] and the setters, then [`VitCxParams::check`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VitCxParams {
    /// Block whose first LayerNorm output gives the feature maps; negative counts from the end.
    /// Default -1, the last block (reference: `model.blocks[-1].norm1`).
    pub layer: i64,
    /// A tap by name (`blocks.5`, see `vitcx inspect`) instead of `layer`'s first norm.
    /// Default none.
    pub tap: Option<String>,
    /// Clustering distance threshold in [0, 1]; masks closer than this are merged.
    /// Default 0.1 (reference `distance_threshold`).
    pub threshold: f64,
    /// Standard deviation of the Gaussian noise added outside each mask, in normalised pixel units.
    /// Default 0.1 (paper section 3.3, reference code).
    pub noise_std: f32,
    /// Seed of the noise generator. Default 0: the same inputs give the same saliency.
    pub seed: u64,
    /// Images per forward pass for the perturbed images. Default 32 (the reference's `gpu_batch` is 50).
    pub batch: usize,
    /// Arithmetic of the perturbed passes. Default f32, as the reference; `Bf16` rounds the
    /// linear layers' operands to bf16 (the clean pass, masks and clustering stay f32).
    pub precision: Precision,
}

impl Default for VitCxParams {
    fn default() -> Self {
        Self {
            layer: -1,
            tap: None,
            threshold: 0.1,
            noise_std: 0.1,
            seed: 0,
            batch: 32,
            precision: Precision::F32,
        }
    }
}

/// [`VitCxParams`] validated against a model: the tap resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedParams {
    /// The 0-based block the tap belongs to.
    pub layer: usize,
    /// The tap the feature maps are read from (`blocks.11.norm1`).
    pub tap: String,
    /// The parameters as given.
    pub params: VitCxParams,
}

impl VitCxParams {
    /// Validates the parameters for a model: the tap resolved (`tap` by name, else `layer`),
    /// threshold, noise and batch in range.
    pub fn check(&self, spec: &Spec) -> Result<CheckedParams> {
        let tap = match &self.tap {
            Some(name) => spec.tap(name)?,
            None => spec.layer_tap(self.layer)?,
        };
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::invalid(format!(
                "threshold {} out of range; expected a value in [0, 1]",
                self.threshold
            )));
        }
        // In normalised pixel units, where an image spans about 5: beyond 10 the noise is the
        // image, and far beyond it the scores overflow to NaN.
        if !self.noise_std.is_finite() || !(0.0..=MAX_NOISE_STD).contains(&self.noise_std) {
            return Err(Error::invalid(format!(
                "noise std {} out of range; expected 0 to {MAX_NOISE_STD}",
                self.noise_std
            )));
        }
        crate::methods::driver::check_batch(self.batch, "batch size")?;
        Ok(CheckedParams {
            layer: tap.layer,
            tap: tap.name.clone(),
            params: self.clone(),
        })
    }
}

/// Where the noise of the perturbed images comes from.
#[derive(Debug, Clone)]
pub enum Noise {
    /// Standard-normal draws from a ChaCha8 generator: mask `i` uses stream `i` of `seed`,
    /// so its noise does not depend on the batch size.
    Seeded(u64),
    /// Given standard-normal draws, one `(3, H, W)` vector per mask in mask order
    /// (for reproducing the reference with its stored noise).
    Given(Vec<Vec<f32>>),
}

/// The class-independent half of an explanation: the prediction, the masks and their
/// clustering, from the clean pass.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Softmax probabilities of the clean image `(C)`.
    pub probs: Vec<f32>,
    /// Feature maps `(D, gh, gw)` of the chosen tap.
    pub feature_maps: Vec<f32>,
    /// The clustering of the `D` raw masks.
    pub clustering: Clustering,
    /// The merged masks `(N, H, W)`.
    pub masks: Masks,
    /// Seconds spent per stage so far.
    pub timings: Vec<(Stage, f64)>,
}

/// The ViT-CX method with checked parameters.
#[derive(Debug, Clone)]
pub struct VitCx {
    params: CheckedParams,
}

impl VitCx {
    /// ViT-CX for `model` with the given parameters (validated here).
    pub fn new(params: &VitCxParams, model: &dyn Backbone) -> Result<Self> {
        Ok(Self {
            params: params.check(model.spec())?,
        })
    }

    /// The checked parameters.
    pub fn params(&self) -> &CheckedParams {
        &self.params
    }

    /// Steps 1-3 (docs/algorithm.md §1-3): predicts `x` `(3, H, W)` (normalised pixels) and
    /// builds the clustered masks, all from one forward pass.
    pub fn prepare(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        progress: &mut dyn Progress,
    ) -> Result<Prepared> {
        let mut run = Run::new(model, x, 0, progress)?;
        let (clean, _) = run.clean(&self.clean_pass(), &Targets::default())?;
        self.masks(&mut run, clean)
    }

    /// Steps 4-5 (§4-5): runs the perturbed images through the model and turns the probability
    /// differences into one saliency map per class in `classes`.
    pub fn score(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        prepared: Prepared,
        classes: &[usize],
        noise: &Noise,
        progress: &mut dyn Progress,
    ) -> Result<Explanation> {
        let probs = prepared.probs.clone();
        let mut run = Run::new(model, x, 0, progress)?.with_timings(prepared.timings.clone());
        let maps = self.causal_scores(&mut run, &prepared, classes, noise)?;
        run.finish(probs, classes.to_vec(), maps)
    }

    /// The whole method with seeded noise; `classes` empty means the top-1 class.
    pub fn explain(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        classes: &[usize],
        progress: &mut dyn Progress,
    ) -> Result<Explanation> {
        let targets = if classes.is_empty() {
            Targets::TopK(1)
        } else {
            Targets::Classes(classes.to_vec())
        };
        explain(self, model, x, &targets, 0, progress)
    }

    /// Masks and clusters from the clean pass's feature maps.
    fn masks(&self, run: &mut Run<'_>, clean: Clean) -> Result<Prepared> {
        let features = clean.features.ok_or_else(|| {
            Error::Unsupported("model returned no feature maps for the requested layer".into())
        })?;
        let (_, d, gh, gw) = features.dims4()?;
        let feature_maps = features.flatten_all()?.to_vec1::<f32>()?;
        let size = run.size;
        let dist = run.stage(SIMILARITY, || {
            Ok(cosine_distances(&feature_maps, d, (gh, gw), size))
        })?;
        let threshold = self.params.params.threshold;
        let clustering = run.stage(CLUSTERING, || complete_linkage(&dist, d, threshold))?;
        // Only the merged masks are made; the D raw ones never exist at full size.
        let masks = run.stage(Stage::MASKS, || {
            let (labels, n) = (&clustering.labels, clustering.n_clusters);
            Ok(merged_masks(&feature_maps, d, (gh, gw), size, labels, n))
        })?;
        Ok(Prepared {
            probs: clean.probs,
            feature_maps,
            clustering,
            masks,
            timings: run.timings().to_vec(),
        })
    }

    /// The perturbed passes and the saliency of each class in `classes`.
    fn causal_scores(
        &self,
        run: &mut Run<'_>,
        prepared: &Prepared,
        classes: &[usize],
        noise: &Noise,
    ) -> Result<Maps> {
        let x = run.x;
        let num_classes = prepared.probs.len();
        check_classes(classes, num_classes)?;
        if classes.is_empty() {
            return Err(Error::invalid("no class to explain"));
        }
        let masks = &prepared.masks;
        let n = masks.n;
        if let Noise::Given(draws) = noise {
            if draws.len() < n || draws.iter().any(|z| z.len() != x.len()) {
                return Err(Error::invalid(format!(
                    "given noise has {} draws; expected {n} of length {}",
                    draws.len(),
                    x.len()
                )));
            }
        }
        let p = &self.params.params;
        let sigma = p.noise_std;
        let with_noise = sigma > 0.0;
        let plane = run.size.0 * run.size.1;

        // Each mask gives a masked image and (with noise) a noisy original (§4).
        let per_mask = if with_noise { 2 } else { 1 };
        let mut pa = Vec::with_capacity(n * num_classes);
        let mut pb = Vec::with_capacity(n * num_classes);
        run.perturbed(
            n,
            per_mask,
            p.batch,
            p.precision,
            None,
            |i, images| {
                let m = masks.mask(i);
                let z = if with_noise {
                    Some(match noise {
                        Noise::Seeded(seed) => standard_normal(*seed, i as u64, x.len()),
                        Noise::Given(draws) => draws[i].clone(),
                    })
                } else {
                    None
                };
                for (c, xc) in x.chunks_exact(plane).enumerate() {
                    for (u, (&xv, &mv)) in xc.iter().zip(m).enumerate() {
                        let e = match &z {
                            Some(z) => sigma * z[c * plane + u] * (1.0 - mv),
                            None => 0.0,
                        };
                        images[0].push(xv * mv + e);
                        if with_noise {
                            images[1].push(xv + e);
                        }
                    }
                }
                Ok(())
            },
            |_, rows| {
                pa.extend_from_slice(rows[0]);
                // At sigma 0 the noisy original is the clean image (§4.3).
                pb.extend_from_slice(rows.get(1).copied().unwrap_or(&prepared.probs));
                Ok(())
            },
        )?;

        let maps = run.stage(Stage::AGGREGATION, || {
            classes
                .iter()
                .map(|&c| {
                    // Each class is explained as the reference explains its target: with its
                    // own p[c] (§1.3).
                    let mut one = saliency(&pa, &pb, num_classes, prepared.probs[c], masks, &[c])?;
                    one.pop().ok_or_else(|| {
                        Error::invalid(format!("no saliency computed for class {c}"))
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut stats = super::driver::Stats::new();
        stats.insert("n_masks".into(), json!(n));
        stats.insert(
            "n_feature_maps".into(),
            json!(prepared.clustering.labels.len()),
        );
        Ok(Maps { maps, stats })
    }
}

impl Method for VitCx {
    fn clean_pass(&self) -> CleanPass {
        CleanPass::Features(self.params.tap.clone())
    }

    fn maps(&self, run: &mut Run<'_>, clean: Clean, classes: &[usize]) -> Result<Maps> {
        let prepared = self.masks(run, clean)?;
        let noise = Noise::Seeded(self.params.params.seed);
        self.causal_scores(run, &prepared, classes, &noise)
    }

    fn params_json(&self) -> serde_json::Value {
        let p = &self.params.params;
        json!({
            "layer": self.params.layer,
            "layer_arg": p.layer,
            "tap": self.params.tap,
            "threshold": p.threshold,
            // Through its shortest decimal form, so 0.1f32 reads 0.1 and not 0.10000000149.
            "noise_std": p.noise_std.to_string().parse::<f64>().unwrap_or(f64::NAN),
            "seed": p.seed,
            "batch": p.batch,
            "precision": p.precision.name(),
        })
    }

    fn describe(&self, ex: &Explanation) -> String {
        format!(
            "ViT-CX  N={} masks  layer {}",
            ex.count("n_masks").unwrap_or(0),
            self.params.layer
        )
    }
}

/// `len` standard-normal draws from stream `stream` of a ChaCha8 generator seeded with `seed`.
pub fn standard_normal(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    (0..len).map(|_| StandardNormal.sample(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_checked() {
        let model = crate::model::demo(&candle_core::Device::Cpu).unwrap();
        let spec = model.spec();
        let p = VitCxParams {
            threshold: 1.5,
            ..Default::default()
        };
        let e = p.check(spec).unwrap_err().to_string();
        assert!(e.contains("threshold 1.5"), "{e}");
        let p = VitCxParams {
            noise_std: f32::NAN,
            ..Default::default()
        };
        assert!(p.check(spec).is_err());
        let p = VitCxParams {
            batch: 0,
            ..Default::default()
        };
        assert!(p.check(spec).is_err());
        let checked = VitCxParams::default().check(spec).unwrap();
        assert_eq!((checked.layer, checked.tap.as_str()), (3, "blocks.3.norm1"));
        let p = VitCxParams {
            tap: Some("blocks.1".into()),
            ..Default::default()
        };
        assert_eq!(p.check(spec).unwrap().layer, 1);
        let p = VitCxParams {
            tap: Some("head".into()),
            ..Default::default()
        };
        let e = p.check(spec).unwrap_err().to_string();
        assert!(e.contains("tap 'head' not in this model"), "{e}");
    }

    #[test]
    fn noise_is_reproducible_and_per_stream() {
        let a = standard_normal(7, 0, 1000);
        assert_eq!(a, standard_normal(7, 0, 1000));
        assert_ne!(a, standard_normal(7, 1, 1000));
        assert_ne!(a, standard_normal(8, 0, 1000));
        let mean = a.iter().sum::<f32>() / 1000.0;
        let var = a.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.15 && (var - 1.0).abs() < 0.2, "{mean} {var}");
    }
}
