//! Files vitcx writes and reads besides checkpoints and images: `.npy` arrays, atomic writes of
//! JSON/CSV/PNG, the overlay picture and the curve plots.

pub mod npy;
pub mod output;
pub mod plot;
pub mod render;

use std::path::Path;

use crate::error::{Error, Result};

/// The bytes of the regular file `path`, at most `max` of them: a FIFO, a device such as
/// `/dev/zero` or a directory is refused before it is read (it could block or never end).
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    let too_big = |n: String| {
        Error::invalid(format!(
            "{}: file is {n} bytes; at most {max} are read",
            path.display()
        ))
    };
    if meta.len() > max {
        return Err(too_big(meta.len().to_string()));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while it is read: never take more than the bound.
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_big(format!("over {max}")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_never_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_bounded(dir.path(), 10).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        #[cfg(unix)]
        {
            let e = read_bounded(Path::new("/dev/zero"), 10)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        let f = dir.path().join("a");
        std::fs::write(&f, b"0123456789ab").unwrap();
        let e = read_bounded(&f, 10).unwrap_err().to_string();
        assert!(e.contains("12 bytes; at most 10"), "{e}");
        assert_eq!(read_bounded(&f, 12).unwrap(), b"0123456789ab");
    }
}
