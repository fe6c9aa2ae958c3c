//! One module per subcommand; none imports another.

pub mod bench;
pub mod compare;
pub mod eval;
pub mod explain;
pub mod inspect;
pub mod merge;
pub mod predict;
pub mod synth;
