//! Minimal NumPy `.npy` reading and writing (format version 1.0/2.0, C order, little endian):
//! enough to write saliency maps people open with `numpy.load` and to read the golden fixtures.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Element data of a `.npy` array, widened to the nearest Rust type
/// (`<f2` is read as `f32`; integers as `i64`).
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `<f4` (and `<f2`, widened).
    F32(Vec<f32>),
    /// `<f8`.
    F64(Vec<f64>),
    /// Signed integers (`<i8`, `<i4`), widened.
    I64(Vec<i64>),
}

/// An array read from a `.npy` file: its shape and flat, row-major data.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The shape, C order.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: NpyData,
}

impl NpyArray {
    /// The data as `f32` (converting `f64` and `i64`), for comparisons in tests and tools.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The data as `f64`.
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            NpyData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::F64(v) => v.clone(),
            NpyData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The data as `i64`, or `None` for a float array.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            NpyData::I64(v) => Some(v),
            _ => None,
        }
    }
}

fn npy_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Npy {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a `.npy` file.
pub fn read_npy(path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy(&bytes).map_err(|reason| npy_err(path, reason))
}

fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start + hlen).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not utf-8")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = dict_value(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
    if fortran.trim() != "False" {
        return Err("fortran-order arrays are not supported".into());
    }
    let shape_str = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape: Vec<usize> = shape_str
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape '{shape_str}'"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let count: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    let (width, little) = match descr.as_bytes() {
        [e, _, rest @ ..] => {
            let w: usize = std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(format!("unsupported dtype '{descr}'"))?;
            (w, *e != b'>')
        }
        _ => return Err(format!("unsupported dtype '{descr}'")),
    };
    if !little && width > 1 {
        return Err(format!("big-endian dtype '{descr}' is not supported"));
    }
    if body.len() < count * width {
        return Err(format!(
            "truncated data: {} bytes for {count} elements of {width} bytes",
            body.len()
        ));
    }
    let kind = descr.as_bytes()[1];
    let chunks = body[..count * width].chunks_exact(width);
    let data = match (kind, width) {
        (b'f', 4) => NpyData::F32(
            chunks
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        ),
        (b'f', 8) => NpyData::F64(
            chunks
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        ),
        (b'f', 2) => NpyData::F32(
            chunks
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        (b'i', 8) => NpyData::I64(
            chunks
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        ),
        (b'i', 4) => NpyData::I64(
            chunks
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64)
                .collect(),
        ),
        _ => return Err(format!("unsupported dtype '{descr}'")),
    };
    Ok(NpyArray { shape, data })
}

/// The raw text of `key`'s value in a Python dict literal like the `.npy` header.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat_a = format!("'{key}':");
    let pat_b = format!("\"{key}\":");
    let at = header
        .find(&pat_a)
        .map(|i| i + pat_a.len())
        .or_else(|| header.find(&pat_b).map(|i| i + pat_b.len()))?;
    let rest = header[at..].trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(&rest[..end])
}

/// Encodes a float32 array as `.npy` bytes (version 1.0, C order, little endian).
pub fn encode_npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let shape_txt = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes a float32 array as a `.npy` file. Fails if `data` does not fill `shape`.
pub fn write_npy_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(npy_err(
            path,
            format!("shape {shape:?} needs {count} values, got {}", data.len()),
        ));
    }
    let bytes = encode_npy_f32(shape, data);
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(&bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        let bytes = encode_npy_f32(&[3, 4], &data);
        assert_eq!(
            (bytes.len() - data.len() * 4) % 64,
            0,
            "header is 64-aligned"
        );
        let arr = parse_npy(&bytes).unwrap();
        assert_eq!(arr.shape, vec![3, 4]);
        assert_eq!(arr.data, NpyData::F32(data));
    }

    #[test]
    fn one_dimensional_shape_has_trailing_comma() {
        let bytes = encode_npy_f32(&[5], &[0.0; 5]);
        let text = String::from_utf8_lossy(&bytes[10..]);
        assert!(text.contains("'shape': (5,)"), "{text}");
        assert_eq!(parse_npy(&bytes).unwrap().shape, vec![5]);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(parse_npy(b"hello world, not numpy").is_err());
        let mut bytes = encode_npy_f32(&[4], &[1.0, 2.0, 3.0, 4.0]);
        bytes.truncate(bytes.len() - 3);
        let err = parse_npy(&bytes).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn reads_golden_float16_noise() {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vit_hf/noise.npy");
        let arr = read_npy(p).unwrap();
        assert_eq!(arr.shape[1..], [3, 224, 224]);
        let v = arr.to_f32();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "standard normal draw, mean {mean}");
    }
}
