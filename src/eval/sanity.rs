//! The sanity check of Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018
//! (<https://arxiv.org/abs/1810.03292>): an explanation that is faithful to the model must change
//! when the model's weights are destroyed. Each image is explained again by the same
//! architecture with its learned weights replaced by random ones, cascading from the top (the
//! head, then the head and the last block, ..., then every block) and all at once (every
//! weight, embeddings included), and the Spearman rank correlation between the trained model's
//! map and each randomised model's map is reported. A method whose map hardly moves (an edge
//! detector, the `center` control) explains the image, not the model.
//!
//! Randomisation: each tensor is replaced by draws from a normal with that tensor's own mean
//! and standard deviation, so activations keep their scale while what was learned is gone.
//! The draws of a tensor depend only on the seed and the tensor's name (its own ChaCha8
//! stream), so a tensor randomised at one cascade step has the same values at every later step,
//! and a run is reproducible.
//!
//! The randomised models are built as a checkpoint is loaded: the checkpoint's tensors, some
//! replaced, go through the family's own `build` ([`crate::model::Family`]); nothing in the
//! model code knows about randomisation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::harness::StepScore;
use crate::error::{Error, Result};
use crate::methods::{Explainer, Progress};
use crate::model::checkpoint as ckpt;
use crate::model::{Backbone, Checkpoint, Format};
use crate::target::Targets;

/// Which weights one step randomises.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// `head`, `head+K` (the head and the last K blocks) or `full` (every weight).
    pub name: String,
    /// The tensors replaced, by their checkpoint names.
    pub tensors: Vec<String>,
}

/// A checkpoint's tensors grouped for randomisation: the head (everything after the last
/// block: final norm, pooling norm, classifier), the blocks in network order, and the rest
/// (embeddings).
#[derive(Debug, Clone, PartialEq)]
pub struct Groups {
    /// Head tensors.
    pub head: Vec<String>,
    /// Each block's tensors, first block first.
    pub blocks: Vec<Vec<String>>,
    /// Everything else (patch and position embeddings, prefix tokens).
    pub rest: Vec<String>,
}

/// Container names whose next path component numbers a block (timm `blocks.N`, Hugging Face
/// `encoder.layer.N` / `encoder.layers.N`, hierarchical models' `layers.S.blocks.B`, `stages.S`).
const BLOCK_CONTAINERS: [&str; 5] = ["blocks", "layer", "layers", "stages", "block"];

/// Path components that mark a tensor after the blocks (timm and Hugging Face names).
const HEAD_PARTS: [&str; 10] = [
    "head",
    "head_dist",
    "fc_norm",
    "norm",
    "classifier",
    "cls_classifier",
    "distillation_classifier",
    "layernorm",
    "post_layernorm",
    "pooler",
];

impl Groups {
    /// Groups tensor names: a name with a block number (`blocks.3.attn.qkv.weight`,
    /// `vit.encoder.layer.3.output.dense.bias`) belongs to that block, blocks ordered by their
    /// numbers; other names go to the head when a component names a head part and none an
    /// embedding, else to the rest. Fails when there is no block or no head.
    pub fn of<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut blocks: BTreeMap<Vec<usize>, Vec<String>> = BTreeMap::new();
        let (mut head, mut rest) = (Vec::new(), Vec::new());
        for name in names {
            let parts: Vec<&str> = name.split('.').collect();
            let key: Vec<usize> = parts
                .windows(2)
                .filter(|w| BLOCK_CONTAINERS.contains(&w[0]))
                .filter_map(|w| w[1].parse().ok())
                .collect();
            if !key.is_empty() {
                blocks.entry(key).or_default().push(name.to_string());
            } else if parts.iter().any(|p| HEAD_PARTS.contains(p))
                && !parts.iter().any(|p| p.contains("embed"))
            {
                head.push(name.to_string());
            } else {
                rest.push(name.to_string());
            }
        }
        if blocks.is_empty() || head.is_empty() {
            return Err(Error::Unsupported(format!(
                "the sanity check cannot tell this checkpoint's {} from its tensor names \
                 (expected blocks.N / encoder.layer.N and a head such as head / classifier)",
                if blocks.is_empty() { "blocks" } else { "head" }
            )));
        }
        for v in blocks.values_mut() {
            v.sort();
        }
        head.sort();
        rest.sort();
        Ok(Groups {
            head,
            blocks: blocks.into_values().collect(),
            rest,
        })
    }

    /// The cascade from the top, `head`, `head+1` (and the last block), ..., `head+L` (every
    /// block), then `full` (every tensor): `L + 2` steps.
    pub fn steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut tensors = self.head.clone();
        steps.push(Step {
            name: "head".into(),
            tensors: tensors.clone(),
        });
        for (k, block) in self.blocks.iter().rev().enumerate() {
            tensors.extend(block.iter().cloned());
            steps.push(Step {
                name: format!("head+{}", k + 1),
                tensors: tensors.clone(),
            });
        }
        tensors.extend(self.rest.iter().cloned());
        steps.push(Step {
            name: "full".into(),
            tensors,
        });
        steps
    }
}

/// A model's checkpoint held in memory, with a randomised copy of every tensor, from which the
/// models of each [`Step`] are built.
#[derive(Debug)]
pub struct Randomiser {
    format: Format,
    config_path: PathBuf,
    config: serde_json::Value,
    preprocessor: Option<(PathBuf, serde_json::Value)>,
    weights_path: PathBuf,
    tensors: HashMap<String, Tensor>,
    random: HashMap<String, Tensor>,
    groups: Groups,
}

/// The bundled demo model's files, the ones [`crate::model::demo`] reads.
use crate::model::load::{DEMO_CONFIG, DEMO_WEIGHTS};

impl Randomiser {
    /// The checkpoint at `path` (a directory or weights file, as [`crate::model::load()`] takes),
    /// or the bundled demo model for `None`, with every tensor's randomised copy drawn with
    /// `seed`.
    pub fn open(path: Option<&Path>, seed: u64, device: &Device) -> Result<Self> {
        let (config_path, config, preprocessor, weights_path, tensors) = match path {
            None => {
                let dir = Path::new(crate::model::DEMO_NAME);
                let (c, w) = (dir.join("config.json"), dir.join("model.safetensors"));
                let config = ckpt::parse_json(&c, DEMO_CONFIG)?;
                let tensors = ckpt::read_tensors_from_buffer(&w, DEMO_WEIGHTS, device)?;
                (c, config, None, w, tensors)
            }
            Some(p) => {
                let files = ckpt::locate(p)?;
                let config = ckpt::read_json(&files.config)?;
                let format = Format::detect(&files.config, &config)?;
                let preprocessor = match &files.preprocessor {
                    Some(p) if format == Format::HuggingFace => {
                        Some((p.clone(), ckpt::read_json(p)?))
                    }
                    _ => None,
                };
                let tensors = ckpt::read_tensors(&files.weights, device)?;
                (files.config, config, preprocessor, files.weights, tensors)
            }
        };
        let format = Format::detect(&config_path, &config)?;
        let groups = Groups::of(tensors.keys().map(String::as_str))?;
        let random = tensors
            .iter()
            .map(|(name, t)| Ok((name.clone(), randomised(t, name, seed)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Randomiser {
            format,
            config_path,
            config,
            preprocessor,
            weights_path,
            tensors,
            random,
            groups,
        })
    }

    /// How the tensors are grouped.
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// The model with the tensors of `step` randomised, built by the checkpoint's family.
    pub fn build(&self, step: &Step, device: &Device) -> Result<Box<dyn Backbone>> {
        let mut tensors = self.tensors.clone();
        for name in &step.tensors {
            let t = self.random.get(name).ok_or_else(|| {
                Error::invalid(format!("step {} names an unknown tensor {name}", step.name))
            })?;
            tensors.insert(name.clone(), t.clone());
        }
        let family = crate::model::family_for(
            crate::model::FAMILIES,
            self.format,
            &self.config,
            &self.config_path,
        )?;
        let mut c = Checkpoint::from_parts(
            &self.config_path,
            self.config.clone(),
            self.preprocessor.clone(),
            &self.weights_path,
            tensors,
        )?;
        c.format = self.format;
        (family.build)(c, device)
    }
}

/// `t` redrawn from a normal with its own mean and standard deviation, seeded by `seed` and
/// `name` (one ChaCha8 stream per name).
fn randomised(t: &Tensor, name: &str, seed: u64) -> Result<Tensor> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let normal = Normal::new(mean, var.sqrt()).map_err(|_| {
        Error::invalid(format!(
            "tensor {name} has no finite mean and standard deviation to randomise with"
        ))
    })?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(name));
    let draws: Vec<f32> = (0..values.len())
        .map(|_| normal.sample(&mut rng) as f32)
        .collect();
    Ok(Tensor::from_vec(draws, t.shape(), t.device())?.to_dtype(t.dtype())?)
}

/// 64-bit FNV-1a of a tensor name: its random stream.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Spearman's rank correlation of two equally long series: Pearson's correlation of their
/// ranks, ties given their mean rank. `None` when the lengths differ, a series is shorter than
/// 2, holds a non-finite value, or is constant (no ranking to compare).
pub fn spearman(a: &[f32], b: &[f32]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 || a.iter().chain(b).any(|v| !v.is_finite()) {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let mean = (n + 1.0) / 2.0;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        let (dx, dy) = (x - mean, y - mean);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return None;
    }
    Some(sab / (saa * sbb).sqrt())
}

/// 1-based ranks, ties sharing their mean rank.
fn ranks(v: &[f32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0f64; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

/// The sanity check of one image: for each step, the model built with those weights
/// randomised explains `x` `(3, H, W)` with each of `explainers` for the class that explainer
/// explained (`classes[k]`), and its map is compared with the trained model's (`maps[k]`).
/// Returns each explainer's scores, in step order. `index` is the image's position (for the
/// seeded controls).
#[allow(clippy::too_many_arguments)]
pub fn check_image(
    randomiser: &Randomiser,
    steps: &[Step],
    device: &Device,
    explainers: &[&Explainer],
    x: &[f32],
    classes: &[usize],
    maps: &[Vec<f32>],
    index: usize,
    progress: &mut dyn Progress,
) -> Result<Vec<Vec<StepScore>>> {
    if explainers.len() != classes.len() || explainers.len() != maps.len() {
        return Err(Error::invalid(
            "the sanity check needs one class and one map per method",
        ));
    }
    let mut out = vec![Vec::with_capacity(steps.len()); explainers.len()];
    for step in steps {
        let model = randomiser.build(step, device)?;
        for (k, ex) in explainers.iter().enumerate() {
            let targets = Targets::Classes(vec![classes[k]]);
            let e = ex.explain(model.as_ref(), x, &targets, index as u64, progress)?;
            let map = e
                .saliency
                .first()
                .ok_or_else(|| Error::invalid("the explanation has no saliency map"))?;
            out[k].push(StepScore {
                step: step.name.clone(),
                spearman: spearman(&maps[k], map),
            });
        }
    }
    Ok(out)
}

/// How the weights are replaced, for reports.
pub const RANDOMISATION: &str =
    "each tensor redrawn from a normal with its own mean and standard deviation, seeded by --seed and the tensor's name";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_by_hand_with_ties() {
        // Monotone but not linear: 1.
        assert!(
            (spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 4.0, 9.0, 100.0]).unwrap() - 1.0).abs() < 1e-12
        );
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        // Ties: a = [1, 2, 2, 3] ranks [1, 2.5, 2.5, 4]; b = [1, 3, 2, 4] ranks [1, 3, 2, 4].
        // Centred: [-1.5, 0, 0, 1.5] and [-1.5, 0.5, -0.5, 1.5]: 4.5 / sqrt(4.5 * 5) = 0.9487.
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((r - 4.5 / (4.5f64 * 5.0).sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(ranks(&[5.0, 1.0, 5.0, 5.0]), [3.0, 1.0, 3.0, 3.0]);
        // Undefined cases.
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0]), None);
        assert_eq!(spearman(&[1.0, f32::NAN], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
    }

    #[test]
    fn tensors_group_into_head_blocks_and_rest() {
        let names = [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "blocks.10.attn.qkv.weight",
            "blocks.2.norm1.weight",
            "blocks.2.mlp.fc1.bias",
            "norm.weight",
            "head.weight",
            "head_dist.bias",
        ];
        let g = Groups::of(names).unwrap();
        assert_eq!(g.head, ["head.weight", "head_dist.bias", "norm.weight"]);
        // Blocks by number, not by text: 2 before 10.
        assert_eq!(
            g.blocks,
            [
                vec!["blocks.2.mlp.fc1.bias", "blocks.2.norm1.weight"],
                vec!["blocks.10.attn.qkv.weight"]
            ]
        );
        assert_eq!(
            g.rest,
            ["cls_token", "patch_embed.proj.weight", "pos_embed"]
        );
        let steps = g.steps();
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["head", "head+1", "head+2", "full"]);
        // The cascade starts at the top: head+1 adds the last block.
        assert!(steps[1]
            .tensors
            .contains(&"blocks.10.attn.qkv.weight".into()));
        assert!(!steps[1].tensors.contains(&"blocks.2.norm1.weight".into()));
        assert_eq!(steps[3].tensors.len(), 9);
        // Hugging Face names.
        let hf = Groups::of([
            "vit.embeddings.patch_embeddings.projection.weight",
            "vit.encoder.layer.0.attention.attention.query.weight",
            "vit.encoder.layer.1.output.dense.bias",
            "vit.layernorm.weight",
            "classifier.weight",
        ])
        .unwrap();
        assert_eq!(hf.blocks.len(), 2);
        assert_eq!(hf.head, ["classifier.weight", "vit.layernorm.weight"]);
        assert!(Groups::of(["a.weight", "head.weight"]).is_err());
        assert!(Groups::of(["blocks.0.a"]).is_err());
    }

    #[test]
    fn randomised_models_are_seeded_and_keep_the_architecture() {
        let dev = Device::Cpu;
        let r = Randomiser::open(None, 3, &dev).unwrap();
        let trained = crate::model::demo(&dev).unwrap();
        let depth = trained.spec().depth;
        assert_eq!(r.groups().blocks.len(), depth);
        let steps = r.groups().steps();
        assert_eq!(steps.len(), depth + 2);
        let (h, w) = trained.spec().input_size;
        let x: Vec<f32> = (0..3 * h * w)
            .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5)
            .collect();
        let px = Tensor::from_vec(x, (1, 3, h, w), &dev).unwrap();
        let logits = |m: &dyn Backbone| {
            m.forward(&px, None)
                .unwrap()
                .logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let base = logits(trained.as_ref());
        let head = r.build(&steps[0], &dev).unwrap();
        assert_eq!(head.spec(), trained.spec());
        let a = logits(head.as_ref());
        assert!(a.iter().zip(&base).any(|(p, q)| (p - q).abs() > 1e-3));
        // Same seed: the same model; another seed: another.
        let again = Randomiser::open(None, 3, &dev).unwrap();
        assert_eq!(logits(again.build(&steps[0], &dev).unwrap().as_ref()), a);
        let other = Randomiser::open(None, 4, &dev).unwrap();
        assert_ne!(logits(other.build(&steps[0], &dev).unwrap().as_ref()), a);
        // A randomised tensor keeps its scale.
        let name = &r.groups().blocks[0][0];
        let stats = |t: &Tensor| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let m = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
            let s = (v.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / v.len() as f64)
                .sqrt();
            (m, s)
        };
        let (m0, s0) = stats(&r.tensors[name]);
        let (m1, s1) = stats(&r.random[name]);
        assert!(
            (m0 - m1).abs() < 0.2 * s0.max(1e-3) + 1e-3,
            "{name}: {m0} vs {m1}"
        );
        assert!((s0 - s1).abs() < 0.2 * s0 + 1e-6, "{name}: {s0} vs {s1}");
        assert_ne!(
            r.tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            r.random[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn a_model_free_map_passes_no_sanity_check() {
        // The centre control ignores the model: its map is the same after any randomisation.
        let dev = Device::Cpu;
        let r = Randomiser::open(None, 0, &dev).unwrap();
        let model = crate::model::demo(&dev).unwrap();
        let params = crate::methods::MethodParams::default();
        let centre = Explainer::by_name("center", &params, model.as_ref()).unwrap();
        let rollout = Explainer::by_name("rollout", &params, model.as_ref()).unwrap();
        let (h, w) = model.spec().input_size;
        let x: Vec<f32> = (0..3 * h * w)
            .map(|i| ((i * 5) % 11) as f32 / 11.0 - 0.5)
            .collect();
        let targets = Targets::Classes(vec![1]);
        let mut maps = Vec::new();
        for ex in [&centre, &rollout] {
            let e = ex
                .explain(
                    model.as_ref(),
                    &x,
                    &targets,
                    0,
                    &mut crate::methods::NoProgress,
                )
                .unwrap();
            maps.push(e.saliency[0].clone());
        }
        let steps = r.groups().steps();
        let scores = check_image(
            &r,
            &steps,
            &dev,
            &[&centre, &rollout],
            &x,
            &[1, 1],
            &maps,
            0,
            &mut crate::methods::NoProgress,
        )
        .unwrap();
        assert_eq!(scores[0].len(), steps.len());
        assert!(scores[0]
            .iter()
            .all(|s| (s.spearman.unwrap() - 1.0).abs() < 1e-12));
        // Rollout reads the attention, which randomising the blocks changes.
        let full = scores[1].last().unwrap();
        assert_eq!(full.step, "full");
        assert!(full.spearman.unwrap() < 0.99, "{full:?}");
        assert!(check_image(
            &r,
            &steps,
            &dev,
            &[&centre],
            &x,
            &[],
            &maps[..1],
            0,
            &mut crate::methods::NoProgress
        )
        .is_err());
    }
}
