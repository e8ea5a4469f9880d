//! The CPU emulator's launcher: kernels/emu/emu_runtime.cpp, linked when build.rs found a
//! C++ compiler (`cfg(pwself_emu)`). Arguments go over as cuLaunchKernel takes them: an
//! array of pointers, one per parameter, each to the parameter's value.

use cudarc::driver::LaunchConfig;

use super::context::Arg;
use crate::error::{Error, Result};

/// Whether this binary carries the emulator.
pub const AVAILABLE: bool = cfg!(pwself_emu);

#[cfg(pwself_emu)]
extern "C" {
    fn pwself_emu_launch(
        name: *const std::ffi::c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        args: *mut *mut std::ffi::c_void,
        kinds: *const i32,
        sizes: *const i32,
        nargs: i32,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> i32;
}

/// Runs `kernel` on the emulator, to completion.
///
/// # Safety
/// As [`Gpu::launch`](super::Gpu::launch): `args` match the kernel's parameters and every
/// address (a host address under the emulator) covers what the kernel touches.
#[cfg(pwself_emu)]
pub unsafe fn launch(module: &str, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    // One 8-byte slot per argument, holding its value; the kernel reads each slot as its
    // parameter's type.
    let mut slots: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::I32(x) => u64::from(x as u32),
            Arg::U32(x) => u64::from(x),
            Arg::F32(x) => u64::from(x.to_bits()),
            Arg::F64(x) => x.to_bits(),
        })
        .collect();
    // What each argument is, for the emulator to check against the kernel's parameters
    // (kinds as in cuda_emu.h: 0 pointer, 1 integer, 2 float).
    let (kinds, sizes): (Vec<i32>, Vec<i32>) = args
        .iter()
        .map(|a| match a {
            Arg::Ptr(_) => (0, 8),
            Arg::U64(_) => (1, 8),
            Arg::I32(_) | Arg::U32(_) => (1, 4),
            Arg::F32(_) => (2, 4),
            Arg::F64(_) => (2, 8),
        })
        .unzip();
    let mut ptrs: Vec<*mut std::ffi::c_void> =
        slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
    let name = std::ffi::CString::new(kernel).expect("kernel names have no NUL");
    let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
    let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
    let mut err = vec![0u8; 512];
    // The emulator's thread and block indices are globals of the C++ runtime: one launch at
    // a time per process (tests may drive two emulated GPUs from two threads).
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rc = pwself_emu_launch(
        name.as_ptr(),
        grid.as_ptr(),
        block.as_ptr(),
        cfg.shared_mem_bytes,
        ptrs.as_mut_ptr(),
        kinds.as_ptr(),
        sizes.as_ptr(),
        args.len() as i32,
        err.as_mut_ptr().cast(),
        err.len(),
    );
    if rc != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        return Err(Error::cuda(
            format!("emulating {module}::{kernel}"),
            String::from_utf8_lossy(&err[..end]),
        ));
    }
    Ok(())
}

/// Without a C++ compiler at build time there is no emulator.
///
/// # Safety
/// Never touches memory.
#[cfg(not(pwself_emu))]
pub unsafe fn launch(module: &str, kernel: &str, _cfg: LaunchConfig, _args: &[Arg]) -> Result<()> {
    Err(Error::cuda(
        format!("emulating {module}::{kernel}"),
        "this binary has no kernel emulator (built without a C++ compiler)",
    ))
}
