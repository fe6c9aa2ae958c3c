//! Control saliency maps: what an explanation must beat to mean anything. A random map says
//! where a method lands by chance; a centred Gaussian blob says what a centre bias alone buys
//! (objects are often near the middle). `vitcx eval --method random|center` scores them with the
//! same metrics as a real method.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::driver::{Clean, CleanPass, Explanation, Maps, Method, Run};
use crate::error::Result;

/// The `random` control: independent uniform noise per pixel, seeded per image index.
#[derive(Debug, Clone, Copy)]
pub struct Random {
    seed: u64,
}

impl Random {
    /// The control with its seed.
    pub fn new(seed: u64) -> Self {
        Random { seed }
    }
}

impl Method for Random {
    fn clean_pass(&self) -> CleanPass {
        CleanPass::Probs
    }

    fn maps(&self, run: &mut Run<'_>, _: Clean, classes: &[usize]) -> Result<Maps> {
        let m = random_map(run.size, self.seed, run.index);
        Ok(Maps::same_for_each(m, classes.len()))
    }

    fn params_json(&self) -> serde_json::Value {
        json!({
            "map": "independent uniform [0, 1) per pixel, ChaCha8 stream = image index",
            "seed": self.seed,
        })
    }

    fn describe(&self, _: &Explanation) -> String {
        "control: random map".into()
    }
}

/// The `center` control: a centred Gaussian blob.
#[derive(Debug, Clone, Copy)]
pub struct Center;

impl Method for Center {
    fn clean_pass(&self) -> CleanPass {
        CleanPass::Probs
    }

    fn maps(&self, run: &mut Run<'_>, _: Clean, classes: &[usize]) -> Result<Maps> {
        Ok(Maps::same_for_each(
            centered_gaussian(run.size),
            classes.len(),
        ))
    }

    fn params_json(&self) -> serde_json::Value {
        json!({
            "map": "Gaussian blob at the image centre, peak 1",
            "sigma_fraction_of_side": CENTER_SIGMA,
        })
    }

    fn describe(&self, _: &Explanation) -> String {
        "control: centred Gaussian".into()
    }
}

/// Standard deviation of [`centered_gaussian`] as a fraction of the image side.
pub const CENTER_SIGMA: f32 = 0.25;

/// Independent uniform [0, 1) values, one per pixel of `(H, W)`, from the ChaCha8 stream
/// `index` of `seed`: the same image index gets the same map on every run and machine.
pub fn random_map((h, w): (usize, usize), seed: u64, index: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    (0..h * w).map(|_| rng.random::<f32>()).collect()
}

/// A Gaussian blob centred on the image, standard deviation [`CENTER_SIGMA`] times each side,
/// peak 1, `(H, W)` row-major.
pub fn centered_gaussian((h, w): (usize, usize)) -> Vec<f32> {
    let (cy, cx) = ((h as f32 - 1.0) / 2.0, (w as f32 - 1.0) / 2.0);
    let (sy, sx) = (CENTER_SIGMA * h as f32, CENTER_SIGMA * w as f32);
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let dy = (y as f32 - cy) / sy;
        for x in 0..w {
            let dx = (x as f32 - cx) / sx;
            out.push((-0.5 * (dy * dy + dx * dx)).exp());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_map_is_reproducible_per_index() {
        let a = random_map((8, 9), 1, 3);
        assert_eq!(a.len(), 72);
        assert_eq!(a, random_map((8, 9), 1, 3));
        assert_ne!(a, random_map((8, 9), 1, 4));
        assert!(a.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 0.5).abs() < 0.1, "{mean}");
    }

    #[test]
    fn gaussian_peaks_in_the_centre_and_is_symmetric() {
        let g = centered_gaussian((5, 7));
        let at = |y: usize, x: usize| g[y * 7 + x];
        assert_eq!(at(2, 3), 1.0);
        assert_eq!(at(0, 0), at(4, 6));
        assert_eq!(at(0, 3), at(4, 3));
        assert!(at(0, 0) < at(1, 1) && at(1, 1) < at(2, 3));
    }
}
