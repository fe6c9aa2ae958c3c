//! Explanation methods.

pub mod controls;
pub mod gradcam;
pub mod registry;
pub mod rise;
pub mod rollout;
pub mod vitcx;

pub use registry::*;
