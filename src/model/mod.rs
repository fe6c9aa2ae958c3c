//! Models: the [`Backbone`] seam every method talks to, the registry of model families behind
//! [`load()`], the checkpoint formats they read, and vitcx's CPU kernels.
//!
//! Dependencies inside point one way: `load` -> `families` (each family, e.g. `vit`) ->
//! `checkpoint`, `config`, `weights`, `kernels` -> `backbone`. A family is one file (or folder)
//! under `families/` plus its name in the registry line of [`families`].

pub mod backbone;
pub mod checkpoint;
pub mod config;
pub mod families;
pub mod hub;
pub(crate) mod kernels;
pub(crate) mod layers;
pub mod load;
pub(crate) mod pickle;
pub mod weights;

pub use backbone::{
    resolve_layer, Attention, Backbone, Forward, Precision, Spec, TapGradient, TapInfo,
};
pub use checkpoint::{Checkpoint, Family};
pub use config::{Format, Preprocess};
pub use families::FAMILIES;
pub use load::{
    demo, demo_held_out_accuracy, device, family_for, load, load_at, load_from_memory, load_with,
    DEMO_NAME,
};
