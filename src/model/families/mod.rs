//! The registry of model families. A family is a module here (one file, or a folder as `vit/`)
//! that defines a type implementing [`super::backbone::Backbone`] and a `pub const FAMILY:
//! Family` saying which checkpoints it reads and how to build it; registering it is adding its
//! name to the one line below. Nothing else (methods, commands) changes.

use super::checkpoint::Family;

/// Declares each family's module and lists its `FAMILY` in [`FAMILIES`], in order, so that a
/// module cannot be declared without being registered or registered without being declared.
macro_rules! families {
    ($($name:ident),+ $(,)?) => {
        $(pub mod $name;)+

        /// Every family vitcx loads, asked in this order whether it reads a checkpoint.
        pub static FAMILIES: &[Family] = &[$($name::FAMILY),+];
    };
}

families![vit, beit, eva, swin];
