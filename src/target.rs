//! What is explained: which classes ([`Targets`]) and which output of the model ([`Score`]).
//!
//! Kept apart from the methods, as pytorch-grad-cam keeps its targets apart from its CAMs: the
//! same targets go to every method, and a method states which score it explains.

use candle_core::Tensor;

use crate::error::{Error, Result};

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

/// The output of the model a method explains for a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// The softmax probability (ViT-CX, RISE and the deletion/insertion curves).
    Probability,
    /// The pre-softmax logit (Grad-CAM, as pytorch-grad-cam's `ClassifierOutputTarget`).
    Logit,
}

impl Score {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Score::Probability => "probability",
            Score::Logit => "logit",
        }
    }

    /// The sum over images `b` of this score of class `classes[b]`, from logits `(B, C)`: the
    /// scalar whose gradient a gradient method takes (each image's term depends on it alone).
    pub fn of(self, logits: &Tensor, classes: &[usize]) -> Result<Tensor> {
        let (b, c) = logits.dims2()?;
        if classes.len() != b {
            return Err(Error::invalid(format!(
                "{} classes given for a batch of {b} images",
                classes.len()
            )));
        }
        check_classes(classes, c)?;
        let mut onehot = vec![0f32; b * c];
        for (i, &k) in classes.iter().enumerate() {
            onehot[i * c + k] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, (b, c), logits.device())?;
        let scores = match self {
            Score::Logit => logits.clone(),
            // The differentiable softmax (candle's softmax_last_dim has no backward pass).
            Score::Probability => candle_nn::ops::softmax(logits, candle_core::D::Minus1)?,
        };
        Ok((scores * onehot)?.sum_all()?)
    }
}

/// Index of the largest value (first on ties); 0 for an empty slice.
pub fn argmax(v: &[f32]) -> usize {
    top_k(v, 1).first().copied().unwrap_or(0)
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Fails unless every class id is below `num_classes`.
pub fn check_classes(classes: &[usize], num_classes: usize) -> Result<()> {
    match classes.iter().find(|&&c| c >= num_classes) {
        Some(c) => Err(Error::invalid(format!(
            "class {c} out of range; model has {num_classes} classes (0 to {})",
            num_classes.saturating_sub(1)
        ))),
        None => Ok(()),
    }
}

/// A class given as an id or as an exact label of `labels`, checked against the model.
pub fn class_id(c: &str, labels: &[String]) -> Result<usize> {
    let id = match c.parse::<usize>() {
        Ok(id) => id,
        Err(_) => labels.iter().position(|l| l == c).ok_or_else(|| {
            Error::invalid(format!(
                "class '{c}' is neither a class id nor a label of this model"
            ))
        })?,
    };
    check_classes(&[id], labels.len())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
        assert_eq!(argmax(&[0.3, 0.1]), 0);
        let e = check_classes(&[10], 10).unwrap_err().to_string();
        assert!(
            e.contains("class 10 out of range; model has 10 classes"),
            "{e}"
        );
    }

    #[test]
    fn class_by_id_or_label() {
        let labels: Vec<String> = ["cat", "dog"].iter().map(|s| s.to_string()).collect();
        assert_eq!(class_id("1", &labels).unwrap(), 1);
        assert_eq!(class_id("cat", &labels).unwrap(), 0);
        let e = class_id("2", &labels).unwrap_err().to_string();
        assert!(
            e.contains("class 2 out of range; model has 2 classes"),
            "{e}"
        );
        let e = class_id("goldfish", &labels).unwrap_err().to_string();
        assert!(e.contains("class 'goldfish'"), "{e}");
    }

    #[test]
    fn score_picks_each_images_class() {
        let logits =
            Tensor::from_vec(vec![1f32, 2.0, 3.0, 0.0, 0.0, 0.0], (2, 3), &Device::Cpu).unwrap();
        let l = Score::Logit.of(&logits, &[2, 0]).unwrap();
        assert_eq!(l.to_scalar::<f32>().unwrap(), 3.0);
        let p = Score::Probability.of(&logits, &[2, 0]).unwrap();
        let want = 3f32.exp() / (1f32.exp() + 2f32.exp() + 3f32.exp()) + 1.0 / 3.0;
        assert!((p.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        assert!(Score::Logit.of(&logits, &[0]).is_err());
        assert!(Score::Logit.of(&logits, &[0, 3]).is_err());
    }

    #[test]
    fn the_probability_score_has_the_softmax_gradient() {
        let dev = candle_core::Device::Cpu;
        let z = candle_core::Var::from_vec(vec![1.0f32, 2.0, 0.5], (1, 3), &dev).unwrap();
        let g = Score::Probability
            .of(z.as_tensor(), &[1])
            .unwrap()
            .backward()
            .unwrap();
        let g = g
            .get(z.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let e: Vec<f64> = [1.0f64, 2.0, 0.5].iter().map(|v| v.exp()).collect();
        let p: Vec<f64> = e.iter().map(|v| v / e.iter().sum::<f64>()).collect();
        // d p1 / d z_j = p1 (delta_1j - p_j)
        for j in 0..3 {
            let want = p[1] * (f64::from(u8::from(j == 1)) - p[j]);
            assert!(
                (f64::from(g[j]) - want).abs() < 1e-6,
                "{j}: {} vs {want}",
                g[j]
            );
        }
    }
}
