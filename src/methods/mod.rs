//! Explanation methods: ViT-CX ([`vitcx`]) and the methods people compare it with ([`rollout`],
//! [`rise`], [`gradcam`]), plus the control maps of [`controls`].
//!
//! [`driver`] owns what every method shares (input checks, the clean pass, targets, timing,
//! progress, batched perturbed passes); a method implements [`Method`] with its own step only.
//! [`registry`] puts them behind one name each ([`Explainer`]).

pub mod controls;
pub mod driver;
pub mod gradcam;
pub mod registry;
pub mod rise;
pub mod rollout;
pub mod vitcx;

pub use driver::{
    explain, Clean, CleanPass, Explanation, Maps, Method, NoProgress, Progress, Run, Stage, Stats,
};
pub use registry::{entry, parse_list, Explainer, MethodEntry, MethodParams, METHODS};
