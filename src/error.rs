//! The library's error type: one enum, each variant naming the input at fault and what was expected.

use std::path::PathBuf;

/// Everything that can go wrong in vitcx's library. Messages are lowercase, quote the
/// offending value and say what was expected, so the CLI can print them as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written; `source` is the operating system's error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// An image file exists but cannot be used (corrupt, truncated, too large, unknown format).
    #[error("image {}: {reason}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong, and what was expected.
        reason: String,
    },
    /// A checkpoint is missing a file, a tensor or a field, or they disagree.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint file or directory at fault.
        path: PathBuf,
        /// What is wrong, and what was expected.
        reason: String,
    },
    /// A model id could not be resolved to local files (Hub cache, offline mode, download).
    #[error("model '{id}': {reason}")]
    Hub {
        /// The model argument as given (`owner/name[@revision]`).
        id: String,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A `.npy` file is malformed or holds an unsupported dtype.
    #[error("npy {}: {reason}", path.display())]
    Npy {
        /// The `.npy` file.
        path: PathBuf,
        /// What is wrong, and what was expected.
        reason: String,
    },
    /// A parameter is out of range (class id, layer, threshold, batch size, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The requested operation is not available for this model or build.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A tensor operation failed (shape mismatch inside the model, device error).
    #[error("tensor error: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    /// Keeps candle's message and drops the stack trace it captures when `RUST_BACKTRACE` is
    /// set: a user reads one line, not a trace.
    fn from(err: candle_core::Error) -> Self {
        Error::Candle(without_backtrace(err))
    }
}

/// candle's error without the stack trace it wraps around the message, nor the path it adds
/// (vitcx's own errors name the file already).
pub(crate) fn without_backtrace(err: candle_core::Error) -> candle_core::Error {
    let mut err = err;
    loop {
        err = match err {
            candle_core::Error::WithBacktrace { inner, .. }
            | candle_core::Error::WithPath { inner, .. } => *inner,
            e => return e,
        }
    }
}

impl Error {
    /// Shorthand for [`Error::Io`] from a `std::io::Error`.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source: err,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// `Result` with vitcx's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_the_os_error_as_their_source() {
        use std::error::Error as _;
        let os = std::io::Error::from(std::io::ErrorKind::NotFound);
        let shown = os.to_string();
        let e = Error::io("/x/y.png", os);
        assert_eq!(e.to_string(), format!("/x/y.png: {shown}"));
        let source = e.source().expect("a source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn candle_errors_lose_their_stack_trace() {
        let e = candle_core::Error::Msg("shape mismatch".into()).bt();
        let shown = Error::from(e).to_string();
        assert_eq!(shown, "tensor error: shape mismatch");
    }
}
