//! vitcx: causal explanations of Vision Transformer predictions (ViT-CX).
//!
//! ViT-CX (Xie et al., IJCAI 2023, <https://arxiv.org/abs/2211.03064>) explains which pixels
//! caused a ViT's prediction: the patch tokens of one layer become masks, near-duplicate masks
//! are merged by clustering, and the model is run on each masked image to score its causal
//! impact. vitcx reproduces the reference implementation number for number; the algorithm as
//! vitcx computes it is `docs/algorithm.md`.
//!
//! The modules, dependencies pointing down the list:
//! - [`mod@bench`], [`train`]: tools apart from the pipeline (timings, training the demo model);
//! - [`run`]: runs over many images: shards, resumable run records, merging shards;
//! - [`eval`]: faithfulness metrics, the data sets they run over, their reports, the shapes
//!   benchmark;
//! - [`methods`]: ViT-CX and the methods it is compared with, behind one driver and registry;
//! - [`model`]: the [`model::Backbone`] seam, the registry of model families, checkpoints;
//! - [`io`], [`image`], [`target`], [`resample`], [`error`]: files, pixels, what is explained,
//!   the resampling rules, the error type.
//!
//! ```
//! use vitcx::methods::NoProgress;
//! use vitcx::model::Backbone;
//! use vitcx::{VitCx, VitCxParams};
//!
//! let model = vitcx::model::load("tests/data/vit_timm".as_ref(), &candle_core::Device::Cpu)?;
//! let img = vitcx::image::load_rgb("examples/goldfish.jpg".as_ref())?;
//! let pre = &model.spec().preprocess;
//! let (_, x) = vitcx::image::model_input(&img, pre.input_size, pre.mean, pre.std);
//! let method = VitCx::new(&VitCxParams::default(), &model)?;
//! let ex = method.explain(&model, &x, &[], &mut NoProgress)?; // [] = the top-1 class
//! assert_eq!(ex.saliency[0].len(), 224 * 224);
//! println!("class {} explained with N = {:?} masks", ex.classes[0], ex.count("n_masks"));
//! # Ok::<(), vitcx::Error>(())
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod error;
pub mod eval;
pub mod image;
pub mod io;
pub mod methods;
pub mod model;
pub mod resample;
pub mod run;
pub mod target;
pub mod train;

pub use error::{Error, Result};
pub use methods::vitcx::{Noise, VitCx, VitCxParams};
pub use methods::{Explainer, Explanation, Method, MethodParams};
pub use target::Targets;

/// The README's code runs as a doc test, so the example people copy keeps compiling and working.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
