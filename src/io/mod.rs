//! Files vitcx writes and reads besides checkpoints and images: `.npy` arrays, atomic writes of
//! JSON/CSV/PNG, the overlay picture and the curve plots.

pub mod npy;
pub mod output;
pub mod plot;
pub mod render;
