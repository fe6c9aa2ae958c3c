//! Files.

pub mod npy;
pub mod output;
pub mod render;
