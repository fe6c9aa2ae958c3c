//! Models: the [`Backbone`] seam every method talks to, the registry of model families behind
//! [`load()`], the checkpoint formats they read, and vitcx's CPU kernels.
//!
//! Dependencies inside point one way: `load` -> the families (`vit`) -> `checkpoint`, `config`,
//! `weights`, `kernels` -> `backbone`. A family is one file (or folder) plus one line in
//! [`load::FAMILIES`].

pub mod backbone;
pub mod checkpoint;
pub mod config;
pub mod hub;
pub(crate) mod kernels;
pub mod load;
pub mod vit;
pub mod weights;

pub use backbone::{
    resolve_layer, Attention, Backbone, Forward, Precision, Spec, TapGradient, TapInfo,
};
pub use checkpoint::{Checkpoint, Family};
pub use config::{Format, Preprocess};
pub use load::{
    demo, demo_held_out_accuracy, device, family_for, load, load_from_memory, DEMO_NAME, FAMILIES,
};
