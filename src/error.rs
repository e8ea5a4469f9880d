//! The library's error type. Every variant names what the user controls (a file or a
//! configuration field) and says what to do about it; the CLI prints it as is.

use std::path::PathBuf;

/// Errors the library reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an I/O operation on a file.
    /// (The OS error is part of the message and deliberately not a `source()`: the CLI
    /// prints the error chain, which would repeat it.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A file was read but its contents are not what they should be.
    /// `reason` says what is wrong and how to fix it.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// A configuration value or command-line argument is out of range or inconsistent.
    /// `field` is the name the user wrote (e.g. `--view-sides`, `views.local_scale`).
    #[error("{field}: {reason}")]
    BadConfig { field: String, reason: String },
    /// No CUDA device can be used: the kernels were not built, libcuda is missing, or no
    /// GPU is visible. `reason` says which and how to fix it.
    #[error("no CUDA device: {reason}")]
    NoCuda { reason: String },
    /// The CUDA driver or a library failed while doing `what`.
    #[error("CUDA error in {what}: {reason}")]
    Cuda { what: String, reason: String },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    /// A file whose contents are wrong; `reason` should end with the fix.
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
    /// A configuration field with a bad value; `reason` should end with the fix.
    pub fn bad_config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::BadConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl Error {
    /// A CUDA driver or library failure while doing `what`.
    pub fn cuda(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Cuda {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
