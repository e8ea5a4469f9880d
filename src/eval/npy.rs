//! `.npy` files in and out of the evaluation: feature matrices (float32, one row per image,
//! C order) and integer label vectors, so features computed by any model (PyTorch, timm,
//! JAX) are scored by exactly the same protocols as this engine's. This module only moves
//! numbers between files and `Vec`s; it never interprets them.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};

use crate::error::{Error, Result};

/// How to write a feature file that this module reads.
const MATRIX_FIX: &str =
    "save a 2-D float32 C-order array, e.g. `np.save(p, np.ascontiguousarray(x, dtype=np.float32))`";
/// How to write a label file that this module reads.
const LABELS_FIX: &str = "save a 1-D integer array, e.g. `np.save(p, y.astype(np.int64))`";

fn open(path: &Path) -> Result<NpyFile<BufReader<File>>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    NpyFile::new(BufReader::new(f)).map_err(|e| {
        Error::bad_file(
            path,
            format!("not a readable .npy file ({e}); write it with numpy's `np.save`"),
        )
    })
}

fn type_str(path: &Path, dtype: &DType, fix: &str) -> Result<npyz::TypeStr> {
    match dtype {
        DType::Plain(ts) => Ok(ts.clone()),
        other => Err(Error::bad_file(
            path,
            format!("holds a structured or nested dtype ({other:?}); {fix}"),
        )),
    }
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| {
        Error::bad_file(
            path,
            format!(
                "its data cannot be read ({e}): the file is truncated or damaged; write it again"
            ),
        )
    }
}

/// Reads a 2-D floating-point matrix: `(data, rows, cols)`, row-major. float32 is read as
/// is, float64 is converted to float32 (precision the protocols do not need is dropped).
/// Fortran-order arrays, other dtypes and other ranks are refused with the fix.
pub fn read_matrix(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let npy = open(path)?;
    let shape = npy.shape().to_vec();
    if shape.len() != 2 {
        return Err(Error::bad_file(
            path,
            format!(
                "holds an array of shape {shape:?} ({} dimensions) but features must be 2-D \
                 (images, dims); reshape it (e.g. `x.reshape(len(x), -1)`) and {MATRIX_FIX}",
                shape.len()
            ),
        ));
    }
    if npy.order() == Order::Fortran && shape[0] > 1 && shape[1] > 1 {
        return Err(Error::bad_file(
            path,
            format!("is stored in Fortran order (column-major); {MATRIX_FIX}"),
        ));
    }
    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
    let ts = type_str(path, &npy.dtype(), MATRIX_FIX)?;
    let data: Vec<f32> = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4) => npy.into_vec::<f32>().map_err(read_err(path))?,
        (TypeChar::Float, 8) => npy
            .into_vec::<f64>()
            .map_err(read_err(path))?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        _ => {
            return Err(Error::bad_file(
                path,
                format!("holds dtype `{ts}`, not float32 or float64; {MATRIX_FIX}"),
            ))
        }
    };
    if data.len() != rows * cols {
        return Err(Error::bad_file(
            path,
            format!(
                "holds {} values but its header says {rows}x{cols}: the file is truncated; write it again",
                data.len()
            ),
        ));
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::bad_file(
            path,
            format!(
                "row {} column {} is {} (not finite): features must be finite numbers; \
                 check the model that produced them",
                i / cols.max(1),
                i % cols.max(1),
                data[i]
            ),
        ));
    }
    Ok((data, rows, cols))
}

/// Reads a 1-D vector of class labels, any integer dtype (signed or unsigned, 1 to 8
/// bytes). Negative labels and labels above 65535 are refused, naming the first one.
pub fn read_labels(path: &Path) -> Result<Vec<u16>> {
    let npy = open(path)?;
    let shape = npy.shape().to_vec();
    let is_vector = shape.len() == 1 || (shape.len() == 2 && shape[1] == 1);
    if !is_vector {
        return Err(Error::bad_file(
            path,
            format!("holds an array of shape {shape:?}, but labels are one integer per image; {LABELS_FIX}"),
        ));
    }
    let ts = type_str(path, &npy.dtype(), LABELS_FIX)?;
    let e = read_err(path);
    let wide: Vec<i128> = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Int, 1) => widen(npy.into_vec::<i8>().map_err(&e)?),
        (TypeChar::Int, 2) => widen(npy.into_vec::<i16>().map_err(&e)?),
        (TypeChar::Int, 4) => widen(npy.into_vec::<i32>().map_err(&e)?),
        (TypeChar::Int, 8) => widen(npy.into_vec::<i64>().map_err(&e)?),
        (TypeChar::Uint, 1) => widen(npy.into_vec::<u8>().map_err(&e)?),
        (TypeChar::Uint, 2) => widen(npy.into_vec::<u16>().map_err(&e)?),
        (TypeChar::Uint, 4) => widen(npy.into_vec::<u32>().map_err(&e)?),
        (TypeChar::Uint, 8) => widen(npy.into_vec::<u64>().map_err(&e)?),
        _ => {
            return Err(Error::bad_file(
                path,
                format!("holds dtype `{ts}`, not an integer type; {LABELS_FIX}"),
            ))
        }
    };
    wide.iter()
        .enumerate()
        .map(|(i, &v)| {
            u16::try_from(v).map_err(|_| {
                Error::bad_file(
                    path,
                    format!("label {i} is {v}: labels must be class indices in 0..=65535; renumber the classes from 0"),
                )
            })
        })
        .collect()
}

fn widen<T: Into<i128>>(v: Vec<T>) -> Vec<i128> {
    v.into_iter().map(Into::into).collect()
}

/// Writes `data` `(rows, cols)` row-major as a float32 C-order `.npy` file that
/// `np.load` (and [`read_matrix`]) reads.
///
/// # Panics
/// If `data.len() != rows * cols` (a programming error).
pub fn write_matrix(path: &Path, data: &[f32], rows: usize, cols: usize) -> Result<()> {
    assert_eq!(
        data.len(),
        rows * cols,
        "write_matrix: data is not rows * cols"
    );
    let io = |e| Error::io(path, e);
    let f = File::create(path).map_err(io)?;
    let mut w = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&[rows as u64, cols as u64])
        .writer(BufWriter::new(f))
        .begin_nd()
        .map_err(io)?;
    w.extend(data.iter().copied()).map_err(io)?;
    w.finish().map_err(io)
}

/// Writes `labels` as a 1-D int64 `.npy` file (what [`read_labels`] reads).
pub fn write_labels(path: &Path, labels: &[u16]) -> Result<()> {
    let io = |e| Error::io(path, e);
    let f = File::create(path).map_err(io)?;
    let mut w = npyz::WriteOptions::<i64>::new()
        .default_dtype()
        .shape(&[labels.len() as u64])
        .writer(BufWriter::new(f))
        .begin_nd()
        .map_err(io)?;
    w.extend(labels.iter().map(|&l| i64::from(l))).map_err(io)?;
    w.finish().map_err(io)
}

/// The bytes of a version-1.0 `.npy` file with header dict `dict` (e.g.
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`) and `payload`, padded as
/// the format asks (header ends with a newline at a multiple of 64 bytes). Used by tests
/// to write files numpy would, and files it would not.
pub fn raw_npy_bytes(dict: &str, payload: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Writes `bytes` to `path` (a helper for tests and tools that build `.npy` files by hand).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        write_matrix(&p, &data, 3, 4).unwrap();
        assert_eq!(read_matrix(&p).unwrap(), (data, 3, 4));
        let l = dir.path().join("y.npy");
        write_labels(&l, &[0, 7, 65535]).unwrap();
        assert_eq!(read_labels(&l).unwrap(), vec![0, 7, 65535]);
    }

    #[test]
    fn hand_written_files_follow_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.npy");
        // Little-endian f4, big-endian f8: the same 2x2 matrix.
        let m = [1.0f32, -2.5, 3.25, 4.0];
        let b = raw_npy_bytes(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
            &le_f32(&m),
        );
        write_bytes(&p, &b).unwrap();
        assert_eq!(read_matrix(&p).unwrap(), (m.to_vec(), 2, 2));
        let be: Vec<u8> = m.iter().flat_map(|&x| f64::from(x).to_be_bytes()).collect();
        write_bytes(
            &p,
            &raw_npy_bytes(
                "{'descr': '>f8', 'fortran_order': False, 'shape': (2, 2), }",
                &be,
            ),
        )
        .unwrap();
        assert_eq!(read_matrix(&p).unwrap(), (m.to_vec(), 2, 2));
        // Labels: u1 and i2.
        write_bytes(
            &p,
            &raw_npy_bytes(
                "{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }",
                &[2, 0, 9],
            ),
        )
        .unwrap();
        assert_eq!(read_labels(&p).unwrap(), vec![2, 0, 9]);
        let i2: Vec<u8> = [5i16, 300].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_bytes(
            &p,
            &raw_npy_bytes(
                "{'descr': '<i2', 'fortran_order': False, 'shape': (2,), }",
                &i2,
            ),
        )
        .unwrap();
        assert_eq!(read_labels(&p).unwrap(), vec![5, 300]);
    }

    #[test]
    fn bad_files_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npy");
        let err = |p: &Path| read_matrix(p).unwrap_err().to_string();
        write_bytes(
            &p,
            &raw_npy_bytes(
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                &le_f32(&[1.0; 4]),
            ),
        )
        .unwrap();
        let e = err(&p);
        assert!(
            e.contains("bad.npy") && e.contains("Fortran") && e.contains("np.save"),
            "{e}"
        );
        write_bytes(
            &p,
            &raw_npy_bytes(
                "{'descr': '<i4', 'fortran_order': False, 'shape': (1, 2), }",
                &[0; 8],
            ),
        )
        .unwrap();
        let e = err(&p);
        assert!(e.contains("<i4") && e.contains("float32"), "{e}");
        write_bytes(
            &p,
            &raw_npy_bytes(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 2), }",
                &le_f32(&[1.0; 4]),
            ),
        )
        .unwrap();
        let e = err(&p);
        assert!(e.contains("2-D") && e.contains("reshape"), "{e}");
        // Truncated payload.
        write_bytes(
            &p,
            &raw_npy_bytes(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
                &le_f32(&[1.0; 3]),
            ),
        )
        .unwrap();
        let e = err(&p);
        assert!(e.contains("bad.npy") && e.contains("truncated"), "{e}");
        write_bytes(&p, b"hello").unwrap();
        assert!(err(&p).contains("not a readable .npy"));
        assert!(err(&dir.path().join("missing.npy")).contains("missing.npy"));
        // NaN features.
        write_bytes(
            &p,
            &raw_npy_bytes(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }",
                &le_f32(&[1.0, f32::NAN]),
            ),
        )
        .unwrap();
        assert!(err(&p).contains("not finite"));
        // Labels: negative, too large, float.
        let lab = |dict: &str, payload: &[u8]| {
            write_bytes(&p, &raw_npy_bytes(dict, payload)).unwrap();
            read_labels(&p).unwrap_err().to_string()
        };
        let neg: Vec<u8> = [3i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let e = lab(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }",
            &neg,
        );
        assert!(e.contains("label 1 is -1"), "{e}");
        let big: Vec<u8> = [65536u32].iter().flat_map(|x| x.to_le_bytes()).collect();
        let e = lab(
            "{'descr': '<u4', 'fortran_order': False, 'shape': (1,), }",
            &big,
        );
        assert!(e.contains("65536") && e.contains("0..=65535"), "{e}");
        let e = lab(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &le_f32(&[1.0]),
        );
        assert!(e.contains("not an integer"), "{e}");
        let e = lab(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 2), }",
            &[0; 16],
        );
        assert!(e.contains("one integer per image"), "{e}");
    }

    /// Files written by numpy itself, when python3 with numpy is installed.
    #[test]
    fn numpy_written_files() {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "import numpy as np\n\
             d = r'{}'\n\
             x = np.arange(6, dtype=np.float64).reshape(2, 3) / 4\n\
             np.save(d + '/f8.npy', x)\n\
             np.save(d + '/f4.npy', x.astype(np.float32))\n\
             np.save(d + '/fortran.npy', np.asfortranarray(x.astype(np.float32)))\n\
             np.save(d + '/lab.npy', np.array([0, 4, 2], dtype=np.int32))\n",
            dir.path().display()
        );
        let ok = std::process::Command::new("python3")
            .args(["-c", &script])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("note: python3 with numpy is not available; numpy_written_files skipped");
            return;
        }
        let want: Vec<f32> = (0..6).map(|i| i as f32 / 4.0).collect();
        assert_eq!(
            read_matrix(&dir.path().join("f8.npy")).unwrap(),
            (want.clone(), 2, 3)
        );
        assert_eq!(
            read_matrix(&dir.path().join("f4.npy")).unwrap(),
            (want, 2, 3)
        );
        assert!(read_matrix(&dir.path().join("fortran.npy"))
            .unwrap_err()
            .to_string()
            .contains("Fortran"));
        assert_eq!(
            read_labels(&dir.path().join("lab.npy")).unwrap(),
            vec![0, 4, 2]
        );
        // And numpy reads what this module writes.
        let ours = dir.path().join("ours.npy");
        write_matrix(&ours, &[1.5, 2.5], 1, 2).unwrap();
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import numpy as np; a = np.load(r'{}'); print(a.dtype, a.shape, a.sum())",
                    ours.display()
                ),
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "float32 (1, 2) 4.0"
        );
    }
}
