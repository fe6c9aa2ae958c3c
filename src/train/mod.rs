//! Training a small ViT on the synthetic shapes benchmark ([`crate::eval::synth`]) with candle.
//!
//! This is how the bundled demo model is made. The trainable model IS the inference model: the
//! parameters are candle [`Var`]s named as in a timm state dict, and each step builds a
//! [`VisionTransformer`] from them through the checkpoint loader, so what is trained is exactly
//! what `vitcx explain` later runs, and the saved file is an ordinary timm checkpoint.
//!
//! Recipe: AdamW, cross-entropy, linear warm-up then cosine decay of the learning rate, fresh
//! generated images every step (the generator draws a new position, scale, rotation, colour and
//! background for each) plus flips, 90-degree rotations and a brightness/contrast jitter, none
//! of which changes the class of a shape.

mod init;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::eval::synth::{self, CLASSES};
use crate::model::families::vit::random::{self, random_state_dict, timm_config_json, Arch};
use crate::model::families::vit::VisionTransformer;
use crate::model::Backbone;
use crate::target::argmax;

/// The timm architecture name written into the demo model's `config.json`.
pub const DEMO_ARCHITECTURE: &str = "vit_demo_patch16_224";

/// Synthetic-data seed of the held-out accuracy set (distinct from every training seed).
pub const HELD_OUT_SEED: u64 = 0x7465_7374;

/// Synthetic-data seed of the validation images watched during training (distinct from the
/// held-out set, so that watching them does not tune anything to the reported accuracy).
pub const VALIDATION_SEED: u64 = 0x7661_6c69;

/// Offset added to the training seed to get the synthetic-data seed of the training images, so
/// that training images never coincide with `vitcx synth --seed S` sets for small `S`.
const TRAIN_DATA_SEED_OFFSET: u64 = 0x7472_6169_6e00_0000;

/// Normalisation of the demo model (timm's ViT default, mean = std = 0.5).
const MEAN: [f32; 3] = [0.5; 3];
const STD: [f32; 3] = [0.5; 3];

/// The demo model's architecture: patch 16 on 224 px (a 14x14 token grid, like ViT-B/16), a
/// narrow and shallow transformer so that it trains on two CPU cores in under an hour and
/// explains an image in about a second.
pub fn demo_arch() -> Arch {
    Arch {
        dim: 64,
        depth: 4,
        heads: 4,
        mlp_dim: 128,
        patch: 16,
        image_size: 224,
        num_classes: CLASSES.len(),
        layer_norm_eps: 1e-6,
        options: Default::default(),
    }
}

/// What to train and how.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainParams {
    /// Model sizes.
    pub arch: Arch,
    /// Seed of the initial weights, the training images and the augmentation.
    pub seed: u64,
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (reached after `warmup` steps, then cosine decay to 1% of it).
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Whether to apply flips, 90-degree rotations and brightness/contrast jitter.
    pub augment: bool,
    /// Weight of the token-labelling loss (0 turns it off): every patch token also predicts,
    /// through a training-only linear head, the class of the object covering at least half of
    /// its patch, or "background" (Jiang et al., "All Tokens Matter", NeurIPS 2021). The dense
    /// signal gets a small ViT off the loss plateau far sooner than the \[CLS\] loss alone.
    pub token_label_weight: f64,
    /// Curriculum: the background clutter of the training images rises linearly from 0 (a plain
    /// gradient) to 1 (the benchmark) over this many steps; 0 trains on the benchmark throughout.
    pub clutter_ramp: usize,
    /// 0: a freshly generated image for every sample of every step. N: generate N training
    /// images once (in parallel) and draw each batch from them, augmented afresh each time.
    /// Generating an image costs about as much as a training step spends on it, so a long run
    /// on a pool is faster (measured in docs/performance.md); a pool of tens of thousands of
    /// images is plenty (the PyTorch probe in `scripts/probe_gpu.py` drew 1.15M samples from
    /// 64k).
    pub pool: usize,
    /// Start from a 2-D sine-cosine position embedding and mimetic attention weights
    /// (`src/train/init.rs`) instead of timm's random ones.
    pub mimetic_init: bool,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            arch: demo_arch(),
            seed: 0,
            steps: 3000,
            batch: 64,
            lr: 1e-3,
            warmup: 200,
            weight_decay: 0.05,
            augment: true,
            token_label_weight: 1.0,
            clutter_ramp: 0,
            pool: 0,
            mimetic_init: true,
        }
    }
}

impl TrainParams {
    /// Rejects settings that cannot train.
    pub fn check(&self) -> Result<()> {
        let a = &self.arch;
        if self.steps == 0 || self.batch == 0 {
            return Err(Error::invalid("steps and batch must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid(format!(
                "learning rate {} out of range; expected > 0",
                self.lr
            )));
        }
        if a.dim == 0 || a.heads == 0 || !a.dim.is_multiple_of(a.heads) {
            return Err(Error::invalid(format!(
                "dim {} is not a positive multiple of heads {}",
                a.dim, a.heads
            )));
        }
        if self.pool > 0 && self.clutter_ramp > 0 {
            return Err(Error::invalid(
                "a clutter ramp needs fresh images every step (pool 0)",
            ));
        }
        if a.patch == 0 || !a.image_size.is_multiple_of(a.patch) {
            return Err(Error::invalid(format!(
                "image size {} is not a multiple of patch {}",
                a.image_size, a.patch
            )));
        }
        Ok(())
    }

    /// Background clutter of the training images at 0-based `step` (see `clutter_ramp`).
    pub fn clutter_at(&self, step: usize) -> f32 {
        if self.clutter_ramp == 0 {
            1.0
        } else {
            (step as f32 / self.clutter_ramp as f32).min(1.0)
        }
    }

    /// Learning rate at 0-based `step`: linear warm-up, then cosine from `lr` to `lr / 100`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.steps - self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = self.lr / 100.0;
        floor + 0.5 * (self.lr - floor) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Progress of a training run, reported after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// 1-based step just finished.
    pub step: usize,
    /// Mean cross-entropy of the step's batch.
    pub loss: f64,
    /// Share of the batch classified right (before the update).
    pub batch_accuracy: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// A model being trained: named parameters and the optimiser state.
pub struct Trainer {
    params: TrainParams,
    config_json: serde_json::Value,
    vars: Vec<(String, Var)>,
    /// Training-only token-label head: weight `(C + 1, D)`, bias `(C + 1)`; never saved.
    token_head: (Var, Var),
    opt: AdamW,
    /// Steps taken, also the index of the next step's batch (batches are a function of the
    /// step, so a restored run draws the same images as an uninterrupted one).
    step: usize,
    device: Device,
    /// The generated training images when `params.pool > 0`.
    pool: Vec<synth::Sample>,
}

impl Trainer {
    /// Fresh weights (timm's initialisation scale: N(0, 0.02) matrices and tokens, zero biases,
    /// unit LayerNorm weights) drawn from `params.seed`.
    pub fn new(params: TrainParams, device: &Device) -> Result<Self> {
        let mut trainer = Trainer::without_pool(params, device)?;
        trainer.pool = training_pool(&trainer.params);
        Ok(trainer)
    }

    /// [`Trainer::new`] before its pool is generated (which takes minutes for a large pool, so
    /// [`Trainer::init_from`] checks the checkpoint first).
    fn without_pool(params: TrainParams, device: &Device) -> Result<Self> {
        params.check()?;
        let mut config_json = timm_config_json(&params.arch, DEMO_ARCHITECTURE);
        config_json["label_names"] = serde_json::json!(CLASSES);
        let mut state = random_state_dict(&params.arch, params.seed, device)?;
        if params.mimetic_init {
            init::mimetic(&mut state, &params.arch, params.seed, device)?;
        }
        let mut names: Vec<String> = state.keys().cloned().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        for name in names {
            let var = Var::from_tensor(&state[&name])?;
            vars.push((name, var));
        }
        let (d, c) = (params.arch.dim, params.arch.num_classes);
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed ^ 0x746f_6b65);
        let w = random::normal(&mut rng, (c + 1) * d, random::WEIGHT_STD);
        let token_head = (
            Var::from_tensor(&Tensor::from_vec(w, (c + 1, d), device)?)?,
            Var::zeros(c + 1, DType::F32, device)?,
        );
        let mut all: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        all.extend([token_head.0.clone(), token_head.1.clone()]);
        let opt = AdamW::new(all, params.weight_decay)?;
        Ok(Trainer {
            params,
            config_json,
            vars,
            token_head,
            opt,
            step: 0,
            device: device.clone(),
            pool: Vec::new(),
        })
    }

    /// Like [`Trainer::new`], but starting from the weights of the checkpoint in `dir` (a
    /// vitcx-trained model of the same architecture): a new run warm-started. The optimiser
    /// state and the token-label head start afresh and the schedule starts at step 0; to
    /// continue a run exactly, use [`Trainer::restore`].
    pub fn init_from(params: TrainParams, dir: &Path, device: &Device) -> Result<Self> {
        let mut trainer = Trainer::without_pool(params, device)?;
        let path = dir.join("model.safetensors");
        let state = candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::invalid(format!("cannot read {}: {e}", path.display())))?;
        if state.len() != trainer.vars.len() {
            return Err(Error::invalid(format!(
                "{} holds {} tensors; the architecture to train has {}",
                path.display(),
                state.len(),
                trainer.vars.len()
            )));
        }
        for (name, var) in &trainer.vars {
            var.set(&tensor_like(&state, &path, name, var)?)?;
        }
        trainer.pool = training_pool(&trainer.params);
        Ok(trainer)
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The model as it is now. Built from the live parameters, so the graph from the parameters
    /// to the outputs is tracked and a loss on the outputs can be back-propagated.
    pub fn model(&self) -> Result<VisionTransformer> {
        let state: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        random::in_memory(self.config_json.clone(), state, &self.device)
    }

    /// One optimiser step on a fresh batch.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let p = &self.params;
        let lr = p.lr_at(self.step);
        let batch = training_batch(p, self.step, &self.device, &self.pool)?;
        let (logits, loss) = self.loss(&batch)?;
        let labels = batch.labels;
        let loss_value = f64::from(loss.to_scalar::<f32>()?);
        if !loss_value.is_finite() {
            return Err(Error::invalid(format!(
                "training diverged at step {} (loss {loss_value}); try a lower learning rate",
                self.step + 1
            )));
        }
        let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
        let truth = labels.to_vec1::<u32>()?;
        let right = predicted.iter().zip(&truth).filter(|(a, b)| a == b).count();
        self.opt.step(&loss, lr)?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss: loss_value,
            batch_accuracy: right as f64 / truth.len() as f64,
            lr,
        })
    }

    /// Class logits and the training loss of `batch`.
    fn loss(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let model = self.model()?;
        let w = self.params.token_label_weight;
        // The last block's output: the tokens the head reads.
        let tap = (w > 0.0).then(|| format!("blocks.{}", self.params.arch.depth - 1));
        let out = model.forward(&batch.px, tap.as_deref())?;
        let mut loss = candle_nn::loss::cross_entropy(&out.logits, &batch.labels)?;
        if let Some(maps) = out.features {
            // (B, D, gh, gw) -> (B * gh * gw, D), rows in (b, y, x) order like the token labels.
            let (b, d, gh, gw) = maps.dims4()?;
            let tokens = maps
                .reshape((b, d, gh * gw))?
                .transpose(1, 2)?
                .reshape((b * gh * gw, d))?;
            let (hw, hb) = &self.token_head;
            let tok_logits = tokens
                .matmul(&hw.as_tensor().t()?)?
                .broadcast_add(hb.as_tensor())?;
            let tok_loss = candle_nn::loss::cross_entropy(&tok_logits, &batch.token_labels)?;
            loss = (loss + (tok_loss * w)?)?;
        }
        Ok((out.logits, loss))
    }

    /// Writes `model.safetensors` (timm names) and `config.json` (timm layout with
    /// `label_names`, plus `report` under `vitcx_training` when given: how the model was made
    /// and how well it does) into `dir`, creating it.
    pub fn save(&self, dir: &Path, report: Option<serde_json::Value>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let state: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().contiguous()?)))
            .collect::<Result<_>>()?;
        save_safetensors(&state, &dir.join("model.safetensors"))?;
        let mut config = self.config_json.clone();
        if let Some(r) = report {
            config["vitcx_training"] = r;
        }
        crate::io::output::write_json_atomic(&dir.join("config.json"), &config)
    }
}

impl Trainer {
    /// Writes the whole training state into `dir` so that [`Trainer::restore`] continues the
    /// run exactly: the model as [`Trainer::save`] writes it (loadable by vitcx while training
    /// goes on, `report` under `vitcx_training`), and `train_state.safetensors` (parameters,
    /// token-label head, AdamW moments) with `train_state.json` (the step, the settings, and
    /// `extra`, e.g. the commands and seconds so far). Each file is replaced atomically, the
    /// state last, so an interrupted checkpoint leaves the previous state readable.
    pub fn checkpoint(
        &self,
        dir: &Path,
        report: Option<serde_json::Value>,
        extra: serde_json::Value,
    ) -> Result<()> {
        self.save(dir, report)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let head = [
            ("token_head.weight".to_string(), &self.token_head.0),
            ("token_head.bias".to_string(), &self.token_head.1),
        ];
        let named: Vec<(String, &Var)> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v))
            .chain(head.iter().map(|(n, v)| (n.clone(), *v)))
            .collect();
        for (i, (name, var)) in named.iter().enumerate() {
            tensors.insert(format!("param/{name}"), var.as_tensor().detach());
            tensors.insert(format!("m/{name}"), self.opt.m[i].clone());
            tensors.insert(format!("v/{name}"), self.opt.v[i].clone());
        }
        save_safetensors(&tensors, &dir.join("train_state.safetensors"))?;
        let state = serde_json::json!({
            "format": 1,
            "step": self.step,
            "settings": format!("{:?}", self.params),
            "extra": extra,
        });
        crate::io::output::write_json_atomic(&dir.join("train_state.json"), &state)
    }

    /// Continues the run checkpointed in `dir` by [`Trainer::checkpoint`]: parameters,
    /// optimiser moments and step as they were, with `params` (which must equal the run's
    /// settings, else the continuation would not be the same run). Returns the trainer and the
    /// `extra` value stored with the checkpoint.
    pub fn restore(
        params: TrainParams,
        dir: &Path,
        device: &Device,
    ) -> Result<(Self, serde_json::Value)> {
        let path = dir.join("train_state.json");
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let state: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::invalid(format!("{} is not JSON: {e}", path.display())))?;
        let settings = format!("{params:?}");
        if state["settings"].as_str() != Some(settings.as_str()) {
            return Err(Error::invalid(format!(
                "{} was trained with other settings ({}); expected {settings}",
                path.display(),
                state["settings"]
            )));
        }
        let step = state["step"]
            .as_u64()
            .ok_or_else(|| Error::invalid(format!("{} has no step", path.display())))?
            as usize;
        let mut trainer = Trainer::without_pool(params, device)?;
        let tpath = dir.join("train_state.safetensors");
        let tensors = candle_core::safetensors::load(&tpath, device)
            .map_err(|e| Error::invalid(format!("cannot read {}: {e}", tpath.display())))?;
        let head = [
            (
                "token_head.weight".to_string(),
                trainer.token_head.0.clone(),
            ),
            ("token_head.bias".to_string(), trainer.token_head.1.clone()),
        ];
        let named: Vec<(String, Var)> = trainer
            .vars
            .iter()
            .cloned()
            .chain(head.iter().cloned())
            .collect();
        let get = |key: String, like: &Var| tensor_like(&tensors, &tpath, &key, like);
        for (i, (name, var)) in named.iter().enumerate() {
            var.set(&get(format!("param/{name}"), var)?)?;
            trainer.opt.m[i] = get(format!("m/{name}"), var)?;
            trainer.opt.v[i] = get(format!("v/{name}"), var)?;
        }
        trainer.opt.t = step;
        trainer.step = step;
        trainer.pool = training_pool(&trainer.params);
        Ok((trainer, state["extra"].clone()))
    }
}

/// Writes `tensors` to `dst` through a temporary file and a rename, so a reader never sees half
/// a file; readable by everyone like the other outputs (the safetensors writer creates its file
/// owner-only).
fn save_safetensors(tensors: &HashMap<String, Tensor>, dst: &Path) -> Result<()> {
    let mut name = dst.as_os_str().to_owned();
    name.push(".tmp");
    let tmp = std::path::PathBuf::from(name);
    candle_core::safetensors::save(tensors, &tmp)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))
}

/// Tensor `key` of the file at `path` (read into `tensors`) as f32, checked to have the shape of
/// `like`.
fn tensor_like(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    key: &str,
    like: &Var,
) -> Result<Tensor> {
    let t = tensors
        .get(key)
        .ok_or_else(|| Error::invalid(format!("{} has no tensor {key}", path.display())))?;
    if t.dims() != like.dims() {
        return Err(Error::invalid(format!(
            "{}: {key} is {:?}, the architecture to train needs {:?}",
            path.display(),
            t.dims(),
            like.dims()
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// AdamW with candle_nn's update (decoupled weight decay on every parameter, beta 0.9/0.999,
/// eps 1e-8, bias-corrected moments), its moments kept where a checkpoint can save and restore
/// them: candle_nn's optimiser keeps them private, so a resumed run could not continue exactly.
struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    t: usize,
    weight_decay: f64,
}

impl AdamW {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: Vec<Var>, weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let v = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            vars,
            m,
            v,
            t: 0,
            weight_decay,
        })
    }

    /// Back-propagates `loss` and applies one update with learning rate `lr`.
    fn step(&mut self, loss: &Tensor, lr: f64) -> Result<()> {
        let grads = loss.backward()?;
        self.t += 1;
        let (b1, b2) = (Self::BETA1, Self::BETA2);
        let scale_m = 1.0 / (1.0 - b1.powi(self.t as i32));
        let scale_v = 1.0 / (1.0 - b2.powi(self.t as i32));
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let step = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + Self::EPS)?)?;
            let theta = ((var.as_tensor() * (1.0 - lr * self.weight_decay))? - (step * lr)?)?;
            var.set(&theta)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// One training batch.
struct Batch {
    /// `(B, 3, H, W)` normalised pixels.
    px: Tensor,
    /// `(B)` class ids.
    labels: Tensor,
    /// `(B * gh * gw)` per-patch labels: the class id where the object covers at least half of
    /// the patch, else the number of classes ("background").
    token_labels: Tensor,
}

/// The `params.pool` generated training images (none when the pool is 0).
fn training_pool(p: &TrainParams) -> Vec<synth::Sample> {
    use rayon::prelude::*;
    let size = p.arch.image_size as u32;
    let data_seed = p.seed.wrapping_add(TRAIN_DATA_SEED_OFFSET);
    (0..p.pool as u64)
        .into_par_iter()
        .map(|i| synth::sample_in(&synth::Scene::TRAINING, data_seed, i, (size, size)))
        .collect()
}

/// The batch of training step `step`: sample `step * batch + i` of the training stream for `i`
/// in the batch (or, with a pool, a pool image drawn by that sample's RNG stream), each
/// augmented with its own RNG stream.
fn training_batch(
    p: &TrainParams,
    step: usize,
    device: &Device,
    pool: &[synth::Sample],
) -> Result<Batch> {
    let size = p.arch.image_size;
    let patch = p.arch.patch;
    let data_seed = p.seed.wrapping_add(TRAIN_DATA_SEED_OFFSET);
    let mut px = Vec::with_capacity(p.batch * 3 * size * size);
    let mut labels = Vec::with_capacity(p.batch);
    let mut token_labels = Vec::new();
    for i in 0..p.batch {
        let index = (step * p.batch + i) as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(data_seed ^ 0x6175_6780);
        rng.set_stream(index);
        let fresh;
        let s = if pool.is_empty() {
            fresh = synth::sample_in(
                &synth::Scene::TRAINING.with_clutter(p.clutter_at(step)),
                data_seed,
                index,
                (size as u32, size as u32),
            );
            &fresh
        } else {
            &pool[rng.random_range(0..pool.len())]
        };
        let (img, mask) = if p.augment {
            augment(&s.image, &s.mask, &mut rng)
        } else {
            (s.image.clone(), s.mask.clone())
        };
        px.extend(crate::image::to_input(&img, MEAN, STD));
        labels.push(s.class_id as u32);
        token_labels.extend(patch_labels(
            &mask,
            patch,
            s.class_id as u32,
            CLASSES.len() as u32,
        ));
    }
    Ok(Batch {
        px: Tensor::from_vec(px, (p.batch, 3, size, size), device)?,
        labels: Tensor::from_vec(labels, p.batch, device)?,
        token_labels: Tensor::from_vec(token_labels, p.batch * (size / patch).pow(2), device)?,
    })
}

/// Per-patch labels of a `(H, W)` object mask, row-major over the patch grid: `class` where at
/// least half of the patch's pixels are inside the object, else `background`.
fn patch_labels(mask: &GrayImage, patch: usize, class: u32, background: u32) -> Vec<u32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let (gh, gw) = (h / patch, w / patch);
    let mut out = Vec::with_capacity(gh * gw);
    for gy in 0..gh {
        for gx in 0..gw {
            let mut inside = 0;
            for y in gy * patch..(gy + 1) * patch {
                for x in gx * patch..(gx + 1) * patch {
                    inside += usize::from(mask.get_pixel(x as u32, y as u32).0[0] != 0);
                }
            }
            out.push(if 2 * inside >= patch * patch {
                class
            } else {
                background
            });
        }
    }
    out
}

/// Random flips, a random multiple of 90 degrees of rotation (the same for the image and its
/// object mask) and a brightness/contrast jitter (image only). Shapes keep their class under
/// all of them.
pub fn augment(img: &RgbImage, mask: &GrayImage, rng: &mut ChaCha8Rng) -> (RgbImage, GrayImage) {
    use image::imageops::{flip_horizontal, flip_vertical, rotate90};
    let (mut out, mut m) = (img.clone(), mask.clone());
    if rng.random_bool(0.5) {
        (out, m) = (flip_horizontal(&out), flip_horizontal(&m));
    }
    if rng.random_bool(0.5) {
        (out, m) = (flip_vertical(&out), flip_vertical(&m));
    }
    if out.width() == out.height() && rng.random_bool(0.5) {
        (out, m) = (rotate90(&out), rotate90(&m));
    }
    let contrast: f32 = rng.random_range(0.8..1.2);
    let brightness: f32 = rng.random_range(-20.0..20.0);
    for p in out.pixels_mut() {
        for v in p.0.iter_mut() {
            let x = (f32::from(*v) - 128.0) * contrast + 128.0 + brightness;
            // Rounded half up, without a libm `round` call per value.
            *v = (x.clamp(0.0, 255.0) + 0.5) as u8;
        }
    }
    (out, m)
}

/// Top-1 accuracy of `model` on samples `0..count` of the synthetic shapes drawn from `scene`
/// with `seed`, in batches of `batch`. `progress` gets the number of images done.
pub fn accuracy(
    model: &dyn Backbone,
    scene: &synth::Scene,
    seed: u64,
    count: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<f64> {
    if count == 0 || batch == 0 {
        return Err(Error::invalid("count and batch must be at least 1"));
    }
    let (h, w) = model.spec().input_size;
    let mut right = 0usize;
    let mut done = 0usize;
    while done < count {
        let n = batch.min(count - done);
        let mut px = Vec::with_capacity(n * 3 * h * w);
        let mut truth = Vec::with_capacity(n);
        for i in done..done + n {
            let s = synth::sample_in(scene, seed, i as u64, (h as u32, w as u32));
            px.extend(crate::image::to_input(&s.image, MEAN, STD));
            truth.push(s.class_id);
        }
        let px = Tensor::from_vec(px, (n, 3, h, w), model.device())?;
        let logits = model.forward(&px, None)?.logits.to_dtype(DType::F32)?;
        for (row, t) in logits.to_vec2::<f32>()?.iter().zip(&truth) {
            if argmax(row) == *t {
                right += 1;
            }
        }
        done += n;
        progress(done);
    }
    Ok(right as f64 / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TrainParams {
        TrainParams {
            arch: Arch {
                dim: 16,
                depth: 1,
                heads: 2,
                mlp_dim: 32,
                patch: 8,
                image_size: 32,
                num_classes: CLASSES.len(),
                layer_norm_eps: 1e-6,
                options: Default::default(),
            },
            seed: 3,
            steps: 40,
            batch: 8,
            lr: 3e-3,
            warmup: 5,
            weight_decay: 0.0,
            augment: true,
            token_label_weight: 1.0,
            clutter_ramp: 0,
            pool: 0,
            mimetic_init: true,
        }
    }

    #[test]
    fn clutter_ramps_up_linearly_then_stays_at_the_benchmark() {
        let p = TrainParams {
            clutter_ramp: 10,
            ..Default::default()
        };
        assert_eq!(p.clutter_at(0), 0.0);
        assert_eq!(p.clutter_at(5), 0.5);
        assert_eq!(p.clutter_at(10), 1.0);
        assert_eq!(p.clutter_at(99), 1.0);
        assert_eq!(TrainParams::default().clutter_at(0), 1.0);
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let p = TrainParams {
            steps: 100,
            warmup: 10,
            lr: 1.0,
            ..TrainParams::default()
        };
        assert!((p.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((p.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((p.lr_at(10) - 1.0).abs() < 1e-12);
        assert!(p.lr_at(55) < p.lr_at(20));
        assert!((p.lr_at(100) - 0.01).abs() < 1e-9);
    }

    #[test]
    fn bad_params_are_rejected() {
        let mut p = tiny();
        p.arch.heads = 3;
        assert!(p.check().unwrap_err().to_string().contains("heads"));
        let mut p = tiny();
        p.lr = 0.0;
        assert!(Trainer::new(p, &Device::Cpu).is_err());
        let mut p = tiny();
        (p.pool, p.clutter_ramp) = (10, 5);
        assert!(p.check().unwrap_err().to_string().contains("pool"));
    }

    #[test]
    fn training_lowers_the_loss_on_one_repeated_batch() {
        // Overfitting one batch is the classic check that gradients reach every parameter.
        let mut t = Trainer::new(tiny(), &Device::Cpu).unwrap();
        let batch = training_batch(&t.params, 0, &Device::Cpu, &[]).unwrap();
        let loss_of = |t: &Trainer| t.loss(&batch).unwrap().1.to_scalar::<f32>().unwrap();
        let before = loss_of(&t);
        for _ in 0..30 {
            let loss = t.loss(&batch).unwrap().1;
            t.opt.step(&loss, 3e-3).unwrap();
        }
        let after = loss_of(&t);
        assert!(after < 0.5 * before, "loss {before} -> {after}");
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let t = Trainer::new(tiny(), &Device::Cpu).unwrap();
        let batch = training_batch(&t.params, 0, &Device::Cpu, &[]).unwrap();
        let grads = t.loss(&batch).unwrap().1.backward().unwrap();
        let head = [
            ("token_head.weight".to_string(), t.token_head.0.clone()),
            ("token_head.bias".to_string(), t.token_head.1.clone()),
        ];
        for (name, v) in t.vars.iter().chain(&head) {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
        }
        // The query and key rows of qkv get their gradient only through the attention softmax.
        let d = t.params.arch.dim;
        let qkv = t
            .vars
            .iter()
            .find(|(n, _)| n == "blocks.0.attn.qkv.weight")
            .unwrap();
        let g = grads.get(qkv.1.as_tensor()).unwrap();
        for (part, rows) in [("query", 0), ("key", d)] {
            let n = g
                .narrow(0, rows, d)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let n = n.to_scalar::<f32>().unwrap();
            assert!(n > 0.0, "{part} rows of qkv get no gradient");
        }
    }

    #[test]
    fn same_seed_same_run_and_saved_checkpoint_loads() {
        let run = || {
            let mut t = Trainer::new(tiny(), &Device::Cpu).unwrap();
            let r: Vec<f64> = (0..3).map(|_| t.train_step().unwrap().loss).collect();
            (t, r)
        };
        let (t, a) = run();
        let (_, b) = run();
        assert_eq!(a, b);
        let dir = tempfile::tempdir().unwrap();
        t.save(
            dir.path(),
            Some(serde_json::json!({"held_out_accuracy": 0.5})),
        )
        .unwrap();
        let loaded = crate::model::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.spec().labels, CLASSES.to_vec());
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["vitcx_training"]["held_out_accuracy"], 0.5);
        assert_eq!(loaded.spec().taps[0].grid, (4, 4));
        let px = training_batch(&t.params, 7, &Device::Cpu, &[]).unwrap().px;
        // Resuming from the checkpoint starts from exactly its weights.
        let resumed = Trainer::init_from(tiny(), dir.path(), &Device::Cpu).unwrap();
        let r = resumed.model().unwrap().forward(&px, None).unwrap().logits;
        // Through the same products as the trainer's (gradient-carrying input: candle's
        // matmul, not the packed inference kernel, whose roundings differ).
        let tracked = candle_core::Var::from_tensor(&px).unwrap();
        let l = loaded.forward(tracked.as_tensor(), None).unwrap().logits;
        assert_eq!(crate::model::kernels::max_abs_diff(&r, &l), 0.0);
        let plain = loaded.forward(&px, None).unwrap().logits;
        assert!(crate::model::kernels::max_abs_diff(&plain, &l) < 1e-5);
        // A checkpoint of another architecture is refused with the reason.
        let mut wider = tiny();
        wider.arch.dim = 32;
        wider.arch.mlp_dim = 64;
        let err = Trainer::init_from(wider, dir.path(), &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("needs"), "{err}");
        let x = t.model().unwrap().forward(&px, None).unwrap().logits;
        assert_eq!(crate::model::kernels::max_abs_diff(&x, &l), 0.0);
    }

    #[test]
    fn a_restored_checkpoint_continues_the_run_bit_for_bit() {
        let p = TrainParams { pool: 6, ..tiny() };
        let mut straight = Trainer::new(p.clone(), &Device::Cpu).unwrap();
        let a: Vec<f64> = (0..6)
            .map(|_| straight.train_step().unwrap().loss)
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let mut first = Trainer::new(p.clone(), &Device::Cpu).unwrap();
        let mut b: Vec<f64> = (0..3).map(|_| first.train_step().unwrap().loss).collect();
        first
            .checkpoint(dir.path(), None, serde_json::json!({"note": 1}))
            .unwrap();
        drop(first);
        let (mut second, extra) = Trainer::restore(p.clone(), dir.path(), &Device::Cpu).unwrap();
        assert_eq!(extra["note"], 1);
        assert_eq!(second.step_count(), 3);
        b.extend((0..3).map(|_| second.train_step().unwrap().loss));
        assert_eq!(a, b);
        for ((n, x), (_, y)) in straight.vars.iter().zip(&second.vars) {
            let d = crate::model::kernels::max_abs_diff(x.as_tensor(), y.as_tensor());
            assert_eq!(d, 0.0, "{n}");
        }
        // Other settings are refused: the continuation would be another run.
        let other = TrainParams { lr: 1e-2, ..p };
        let err = Trainer::restore(other, dir.path(), &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("other settings"), "{err}");
    }

    #[test]
    fn augmentation_keeps_size_and_changes_pixels() {
        let s = synth::sample(1, 0, (32, 32));
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let outs: Vec<_> = (0..6)
            .map(|_| augment(&s.image, &s.mask, &mut rng))
            .collect();
        assert!(outs
            .iter()
            .all(|(o, m)| o.dimensions() == (32, 32) && m.dimensions() == (32, 32)));
        assert!(outs.iter().any(|(o, _)| o != &s.image));
        // The mask moves with the object: same number of object pixels, some in new places.
        let count = |m: &GrayImage| m.pixels().filter(|p| p.0[0] != 0).count();
        assert!(outs.iter().all(|(_, m)| count(m) == count(&s.mask)));
        assert!(outs.iter().any(|(_, m)| m != &s.mask));
    }

    #[test]
    fn patch_labels_need_half_coverage() {
        // 4x4 mask, patch 2: top-left patch fully inside, top-right half, bottom-left a quarter.
        let mut m = GrayImage::new(4, 4);
        for (x, y) in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (0, 2)] {
            m.put_pixel(x, y, image::Luma([255]));
        }
        assert_eq!(patch_labels(&m, 2, 3, 6), vec![3, 3, 6, 6]);
    }

    #[test]
    fn a_pool_draws_batches_from_its_images_reproducibly() {
        let p = TrainParams { pool: 5, ..tiny() };
        let pool = training_pool(&p);
        assert_eq!(pool.len(), 5);
        let a = training_batch(&p, 3, &Device::Cpu, &pool).unwrap();
        let b = training_batch(&p, 3, &Device::Cpu, &pool).unwrap();
        assert_eq!(crate::model::kernels::max_abs_diff(&a.px, &b.px), 0.0);
        // Every label of the batch is a pool image's label.
        let classes: Vec<u32> = pool.iter().map(|s| s.class_id as u32).collect();
        for l in a.labels.to_vec1::<u32>().unwrap() {
            assert!(classes.contains(&l));
        }
        // Training on the pool runs and lowers nothing into NaN.
        let mut t = Trainer::new(p, &Device::Cpu).unwrap();
        assert!(t.train_step().unwrap().loss.is_finite());
    }
}
