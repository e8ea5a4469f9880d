//! The kernels' PTX, compiled by build.rs from `kernels/*.cu` and embedded in the binary.

/// One `kernels/<name>.cu`, as PTX for compute_90 and compute_80.
#[derive(Clone, Copy, Debug)]
pub struct PtxModule {
    /// The file stem: `kernels/<name>.cu`.
    pub name: &'static str,
    /// PTX for compute capability 9.0 and newer (the driver JIT-compiles it for the card).
    pub sm_90: &'static str,
    /// PTX for compute capability 8.x.
    pub sm_80: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Whether this binary carries kernels (it was built with nvcc).
pub fn kernels_built() -> bool {
    NVCC.is_some()
}

/// The PTX of module `name` for a card of compute capability `major.minor`, or None when
/// there is no such module or the card is older than 8.0.
pub fn module_ptx(name: &str, major: i32) -> Option<&'static str> {
    let m = MODULES.iter().find(|m| m.name == name)?;
    match major {
        9.. => Some(m.sm_90),
        8 => Some(m.sm_80),
        _ => None,
    }
}
