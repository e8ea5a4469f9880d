//! Asynchronous uploads of view batches: the host writes a batch into page-locked (pinned)
//! memory, the copy stream moves it to the device while the compute stream works on the
//! previous batch, and the compute stream waits on an event before it reads the new one.
//! Two pinned slots alternate, so the host can fill one while the other is in flight.

use cudarc::driver::{CudaEvent, PinnedHostSlice};

use super::context::Gpu;
use super::pool::Buf;
use crate::error::{Error, Result};

struct Slot {
    pinned: PinnedHostSlice<u8>,
    /// Recorded on the copy stream after the slot's last copy: the slot may be refilled once
    /// it completes.
    done: CudaEvent,
}

/// Double-buffered pinned staging for uploads of up to `capacity` bytes each (under the
/// emulator, a plain copy).
pub struct Uploader {
    /// None under the emulator.
    slots: Option<[Slot; 2]>,
    next: usize,
    capacity: usize,
}

impl Uploader {
    /// Two pinned slots of `capacity` bytes.
    pub fn new(gpu: &Gpu, capacity: usize) -> Result<Uploader> {
        if gpu.is_emulated() {
            return Ok(Uploader {
                slots: None,
                next: 0,
                capacity,
            });
        }
        let ctx = gpu.context()?;
        let slot = || -> Result<Slot> {
            // SAFETY: the contents are written before any copy reads them.
            let pinned = unsafe { ctx.alloc_pinned::<u8>(capacity.max(1)) }.map_err(|e| {
                Error::cuda(format!("allocating {capacity} bytes of pinned memory"), e)
            })?;
            let done = ctx
                .new_event(None)
                .map_err(|e| Error::cuda("creating an event", e))?;
            Ok(Slot { pinned, done })
        };
        Ok(Uploader {
            slots: Some([slot()?, slot()?]),
            next: 0,
            capacity,
        })
    }

    /// Largest upload, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Copies `bytes` into the next pinned slot (waiting until that slot's previous copy has
    /// finished), enqueues its copy to `dst` on the copy stream, and makes the compute stream
    /// wait for it: kernels launched afterwards see the data; the host returns at once.
    pub fn upload(&mut self, gpu: &Gpu, bytes: &[u8], dst: &mut Buf<u8>) -> Result<()> {
        assert!(
            bytes.len() <= self.capacity && dst.len() == bytes.len(),
            "upload of {} bytes into a slot of {} and a buffer of {}",
            bytes.len(),
            self.capacity,
            dst.len()
        );
        let Some(slots) = &mut self.slots else {
            return dst.copy_from(bytes);
        };
        let slot = &mut slots[self.next];
        self.next ^= 1;
        slot.done
            .synchronize()
            .map_err(|e| Error::cuda("waiting for a pinned slot", e))?;
        let host = slot
            .pinned
            .as_mut_slice()
            .map_err(|e| Error::cuda("mapping a pinned slot", e))?;
        host[..bytes.len()].copy_from_slice(bytes);
        let copy = gpu.copy_stream()?;
        // `dst` may be a block the compute stream used until now (the pool recycles blocks
        // in compute-stream order): the copy waits for the compute stream's work so far.
        copy.join(gpu.stream()?)
            .map_err(|e| Error::cuda("ordering an upload after compute", e))?;
        let mut view = dst.view_mut().expect("device pools hold device blocks");
        // A view of exactly the batch's bytes (the slot may be larger).
        let src = &host[..bytes.len()];
        // Pinned memory is what makes this copy asynchronous; cudarc takes it as a host slice.
        copy.memcpy_htod(src, &mut view)
            .map_err(|e| Error::cuda("uploading a batch", e))?;
        slot.done
            .record(copy)
            .map_err(|e| Error::cuda("recording an upload event", e))?;
        gpu.stream()?
            .wait(&slot.done)
            .map_err(|e| Error::cuda("ordering compute after an upload", e))
    }
}

/// The check of the staging path: batches of random bytes through both pinned slots (so
/// each slot is reused while the other may be in flight) must arrive byte for byte.
pub fn checks() -> Vec<super::check::KernelCheck> {
    vec![super::check::KernelCheck {
        name: "upload (pinned double-buffered staging on the copy stream)",
        run: check_upload,
    }]
}

fn check_upload(
    gpu: &Gpu,
    inputs: &mut super::check::Inputs,
) -> Result<Vec<super::check::Outcome>> {
    // A batch of 224x224 RGB bytes plus an odd tail, so no copy is a whole number of words.
    let n = 3 * 224 * 224 * 64 + 7;
    let mut uploader = Uploader::new(gpu, n)?;
    let mut sent = Vec::new();
    for _ in 0..4 {
        let bytes: Vec<u8> = (0..n).map(|_| inputs.stream().next_u32() as u8).collect();
        // Poisoned destination: a byte the copy skips keeps 0xAA (a 1-in-256 chance of
        // matching by accident per byte, never for a whole skipped range).
        let mut dst = gpu.pool().upload(&vec![0xAAu8; n])?;
        uploader.upload(gpu, &bytes, &mut dst)?;
        sent.push((bytes, dst));
    }
    gpu.sync()?;
    let mut mismatches = 0usize;
    let mut worst = None;
    for (bytes, dst) in &sent {
        let got = dst.to_vec()?;
        for (i, (g, w)) in got.iter().zip(bytes).enumerate() {
            if g != w {
                mismatches += 1;
                worst.get_or_insert((i, f64::from(*g), f64::from(*w)));
            }
        }
    }
    Ok(vec![super::check::Outcome {
        name: "upload: 4 batches through 2 slots, every byte".to_string(),
        elements: 4 * n,
        max_rel_err: if mismatches == 0 { 0.0 } else { f64::INFINITY },
        bound: 0.0,
        worst,
    }])
}
