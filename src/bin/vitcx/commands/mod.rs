//! One module per subcommand.

pub mod bench;
pub mod compare;
pub mod eval;
pub mod explain;
pub mod synth;
