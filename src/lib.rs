//! vitcx: causal explanations of Vision Transformer predictions (ViT-CX).
//!
//! ViT-CX (Xie et al., IJCAI 2023, <https://arxiv.org/abs/2211.03064>) explains which pixels
//! caused a ViT's prediction: the patch tokens of one layer become masks, near-duplicate masks
//! are merged by clustering, and the model is run on each masked image to score its causal
//! impact. vitcx reproduces the reference implementation number for number.
//!
//! The modules follow the pipeline: [`image`] (decode, resize, normalise) -> [`model`]
//! (checkpoint loading, one forward pass for prediction and tokens) -> [`mask`] (feature maps to
//! masks, similarities) -> [`cluster`] (complete linkage) -> [`score`] (causal scores, coverage
//! correction) -> [`explain`] (the method, wiring the stages) -> [`render`] / [`output`] (files).
//! [`methods`] puts ViT-CX beside the methods people compare it with ([`rollout`], [`rise`],
//! [`gradcam`]) and the control maps of [`controls`]; [`metrics`] scores any of them.
//!
//! ```
//! use vitcx::{methods::vitcx::NoProgress, model::Backbone, VitCx, VitCxParams};
//!
//! let model = vitcx::model::load("tests/data/vit_timm".as_ref(), &candle_core::Device::Cpu)?;
//! let img = vitcx::image::load_rgb("examples/goldfish.jpg".as_ref())?;
//! let pre = &model.config().preprocess;
//! let resized = vitcx::image::resize_bilinear(&img, pre.input_size);
//! let x = vitcx::image::to_input(&resized, pre.mean, pre.std);
//! let method = VitCx::new(&VitCxParams::default(), &model)?;
//! let ex = method.explain(&model, &x, &[], &mut NoProgress)?; // [] = the top-1 class
//! assert_eq!(ex.saliency[0].len(), 224 * 224);
//! println!("class {} explained with N = {} masks", ex.classes[0], ex.n_masks);
//! # Ok::<(), vitcx::Error>(())
//! ```

pub mod bench;
pub mod error;
pub mod eval;
pub mod image;
pub mod io;
pub mod methods;
pub mod model;
pub mod train;

pub use error::{Error, Result};
pub use methods::vitcx::{Explanation, Noise, VitCx, VitCxParams};
pub use methods::{Explainer, Method, MethodParams, Targets};
