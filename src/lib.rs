//! vitcx: causal explanations of Vision Transformer predictions (ViT-CX).
//!
//! ViT-CX (Xie et al., IJCAI 2023, <https://arxiv.org/abs/2211.03064>) explains which pixels
//! caused a ViT's prediction: the patch tokens of one layer become masks, near-duplicate masks
//! are merged by clustering, and the model is run on each masked image to score its causal
//! impact. vitcx reproduces the reference implementation number for number.

pub mod error;
pub mod hub;
pub mod model;
pub mod npy;

pub use error::{Error, Result};
