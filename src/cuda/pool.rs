//! A caching device allocator. The first training steps allocate; later steps take blocks
//! back from the cache, so the step itself rarely calls cuMemAlloc. Blocks are rounded up to
//! a size class and returned to their class's free list when a [`Buf`] is dropped.
//!
//! Some of a step's shapes change from step to step (the matched head rows, and with them
//! the student logits, differ per batch), so a request may also take a cached block up to
//! 1/8 larger than its own class ([`REUSE_SLACK`]): without that, every new row count would
//! be a new class, and the cache would grow step after step (the first H200 run held 110 GiB
//! after 14 steps of ViT-Ti at batch 64, whose live peak is under 10 GiB). When the driver
//! runs out of memory, the cache is released and the allocation tried once more, so a
//! request fails only when the buffers in use leave no room.
//!
//! Under the CPU emulator (`Gpu::emulated`) blocks are host memory, and a buffer's address is
//! an ordinary pointer that the emulated kernels dereference.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use crate::error::{Error, Result};

/// Size class of a request: powers of two up to 1 MiB, then multiples of 2 MiB, so a block
/// wastes at most half of a small request and 2 MiB of a large one.
pub fn size_class(bytes: usize) -> usize {
    const MIB: usize = 1 << 20;
    let bytes = bytes.max(256);
    if bytes <= MIB {
        bytes.next_power_of_two()
    } else {
        bytes.div_ceil(2 * MIB) * 2 * MIB
    }
}

#[derive(Default)]
struct Counters {
    mallocs: AtomicU64,
    reuses: AtomicU64,
    bytes_allocated: AtomicU64,
    bytes_in_use: AtomicU64,
    peak_in_use: AtomicU64,
    cache_releases: AtomicU64,
    guard_violations: AtomicU64,
}

/// A request of class `c` may take a cached block of up to `c + c / REUSE_SLACK` bytes.
pub const REUSE_SLACK: usize = 8;

/// The byte written after the end of every buffer in guard mode.
const CANARY: u8 = 0xA5;

/// A block of memory: on the device, or (emulator) on the host, 16-byte aligned.
enum Block {
    Device(CudaSlice<u8>),
    Host(Vec<u128>),
}

impl Block {
    fn address(&self, stream: Option<&Arc<CudaStream>>) -> u64 {
        match self {
            Block::Device(raw) => {
                let stream = stream.expect("device blocks come from a device pool");
                let (p, _guard) = raw.device_ptr(stream);
                p
            }
            Block::Host(v) => v.as_ptr() as u64,
        }
    }
}

struct Inner {
    /// The compute stream; None for the emulator's host pool.
    stream: Option<Arc<CudaStream>>,
    /// Cached blocks by size class, smallest first.
    free: Mutex<BTreeMap<usize, Vec<Block>>>,
    counters: Counters,
    /// Guard mode (check-kernels): the slack after each buffer's end holds CANARY, checked
    /// when the buffer is dropped, so a kernel writing past a buffer's end is caught.
    guard: std::sync::atomic::AtomicBool,
}

/// The allocator; cheap to clone (all clones share one cache).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What the allocator has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls to the driver's allocator.
    pub mallocs: u64,
    /// Requests served from the cache.
    pub reuses: u64,
    /// Device bytes held, in use or cached.
    pub bytes_allocated: u64,
    /// Bytes of the blocks that live buffers hold.
    pub bytes_in_use: u64,
    /// The most bytes in use at once (the figure PyTorch calls max_memory_allocated).
    pub peak_in_use: u64,
    /// Times the cache was given back to the driver because an allocation failed.
    pub cache_releases: u64,
    /// Buffers (allocated in guard mode) whose slack was overwritten: a kernel wrote past
    /// a buffer's end.
    pub guard_violations: u64,
}

impl Pool {
    /// An empty cache whose blocks are allocated on (and ordered with) `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Pool {
        Pool::with_stream(Some(stream))
    }

    /// An empty cache of host blocks, for the CPU emulator.
    pub fn host() -> Pool {
        Pool::with_stream(None)
    }

    fn with_stream(stream: Option<Arc<CudaStream>>) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                stream,
                free: Mutex::new(BTreeMap::new()),
                counters: Counters::default(),
                guard: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// A buffer of `len` elements of `T`, contents undefined.
    pub fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<Buf<T>> {
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        let class = size_class(bytes);
        let c = &self.inner.counters;
        let (class, raw) = match self.take_cached(class) {
            Some(found) => {
                c.reuses.fetch_add(1, Ordering::Relaxed);
                found
            }
            None => {
                let raw = match self.malloc(class) {
                    Err(e) if is_out_of_memory(&e) && self.release_cache()? > 0 => {
                        self.malloc(class)?
                    }
                    r => r?,
                };
                c.mallocs.fetch_add(1, Ordering::Relaxed);
                c.bytes_allocated.fetch_add(class as u64, Ordering::Relaxed);
                (class, raw)
            }
        };
        let in_use = c.bytes_in_use.fetch_add(class as u64, Ordering::Relaxed) + class as u64;
        c.peak_in_use.fetch_max(in_use, Ordering::Relaxed);
        let ptr = raw.address(self.inner.stream.as_ref());
        let guarded = self.inner.guard.load(Ordering::Relaxed);
        if guarded {
            self.fill_slack(ptr + bytes as u64, class - bytes)?;
        }
        Ok(Buf {
            raw: Some(raw),
            ptr,
            len,
            bytes,
            guarded,
            class,
            pool: self.clone(),
            _t: PhantomData,
        })
    }

    /// The smallest cached block of class `class` up to `class + class / REUSE_SLACK`, with
    /// its class.
    fn take_cached(&self, class: usize) -> Option<(usize, Block)> {
        let mut free = self.inner.free.lock().expect("pool lock");
        let (&found, blocks) = free
            .range_mut(class..=class + class / REUSE_SLACK)
            .find(|(_, blocks)| !blocks.is_empty())?;
        blocks.pop().map(|b| (found, b))
    }

    /// A new block of `class` bytes from the driver (or the host, under the emulator).
    fn malloc(&self, class: usize) -> Result<Block> {
        match &self.inner.stream {
            // SAFETY: u8 has no invalid bit patterns; contents are documented as undefined.
            Some(stream) => Ok(Block::Device(
                unsafe { stream.alloc::<u8>(class) }.map_err(|e| {
                    Error::cuda(format!("allocating {class} bytes of device memory"), e)
                })?,
            )),
            None => Ok(Block::Host(vec![0u128; class / 16])),
        }
    }

    /// Gives every cached block back to the driver (after the stream's work, which may
    /// still use them); returns the bytes released.
    pub fn release_cache(&self) -> Result<u64> {
        let blocks: Vec<(usize, Block)> =
            std::mem::take(&mut *self.inner.free.lock().expect("pool lock"))
                .into_iter()
                .flat_map(|(class, v)| v.into_iter().map(move |b| (class, b)))
                .collect();
        let bytes: u64 = blocks.iter().map(|(class, _)| *class as u64).sum();
        if let Some(stream) = &self.inner.stream {
            stream
                .synchronize()
                .map_err(|e| Error::cuda("waiting for the stream before releasing memory", e))?;
        }
        drop(blocks);
        if let Some(stream) = &self.inner.stream {
            stream
                .synchronize()
                .map_err(|e| Error::cuda("waiting for the released memory", e))?;
        }
        let c = &self.inner.counters;
        c.bytes_allocated.fetch_sub(bytes, Ordering::Relaxed);
        c.cache_releases.fetch_add(1, Ordering::Relaxed);
        Ok(bytes)
    }

    /// A buffer holding a copy of `host`.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<Buf<T>> {
        let mut buf = self.alloc::<T>(host.len())?;
        buf.copy_from(host)?;
        Ok(buf)
    }

    /// Turns guard mode on or off: with it on, every buffer allocated afterwards has its
    /// slack filled with a canary that is checked when the buffer is dropped
    /// ([`PoolStats::guard_violations`] counts the buffers whose canary was overwritten).
    pub fn set_guard(&self, on: bool) {
        self.inner.guard.store(on, Ordering::Relaxed);
    }

    fn fill_slack(&self, at: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match &self.inner.stream {
            // SAFETY: [at, at + len) is the block's slack, inside the allocation.
            Some(stream) => unsafe {
                cudarc::driver::result::memset_d8_async(at, CANARY, len, stream.cu_stream())
            }
            .map_err(|e| Error::cuda("writing a guard canary", e)),
            None => {
                // SAFETY: as above, host memory.
                unsafe { std::ptr::write_bytes(at as *mut u8, CANARY, len) };
                Ok(())
            }
        }
    }

    /// Whether the slack [at, at + len) still holds the canary (waits for the stream).
    fn slack_intact(&self, at: u64, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        let mut host = vec![0u8; len];
        match &self.inner.stream {
            Some(stream) => {
                // SAFETY: [at, at + len) lies inside the block; the copy is synchronous after
                // the stream's work.
                let ok = stream.synchronize().is_ok()
                    && unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host, at) }.is_ok();
                ok && host.iter().all(|&b| b == CANARY)
            }
            None => {
                // SAFETY: host memory inside the block.
                unsafe { std::ptr::copy_nonoverlapping(at as *const u8, host.as_mut_ptr(), len) };
                host.iter().all(|&b| b == CANARY)
            }
        }
    }

    /// Counters since the pool was made.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        PoolStats {
            mallocs: c.mallocs.load(Ordering::Relaxed),
            reuses: c.reuses.load(Ordering::Relaxed),
            bytes_allocated: c.bytes_allocated.load(Ordering::Relaxed),
            bytes_in_use: c.bytes_in_use.load(Ordering::Relaxed),
            peak_in_use: c.peak_in_use.load(Ordering::Relaxed),
            cache_releases: c.cache_releases.load(Ordering::Relaxed),
            guard_violations: c.guard_violations.load(Ordering::Relaxed),
        }
    }

    /// The stream blocks are ordered on (None under the emulator).
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        self.inner.stream.as_ref()
    }

    fn give_back(&self, class: usize, raw: Block) {
        self.inner
            .counters
            .bytes_in_use
            .fetch_sub(class as u64, Ordering::Relaxed);
        self.inner
            .free
            .lock()
            .expect("pool lock")
            .entry(class)
            .or_default()
            .push(raw);
    }
}

/// Whether `e` is the driver running out of device memory.
pub fn is_out_of_memory(e: &Error) -> bool {
    let s = e.to_string().to_ascii_uppercase();
    s.contains("OUT_OF_MEMORY") || s.contains("OUT OF MEMORY")
}

/// `len` elements of `T` in device memory, from a [`Pool`]; dropping it returns the block to
/// the cache. Kernels take it through [`ptr`](Self::ptr).
pub struct Buf<T> {
    raw: Option<Block>,
    ptr: u64,
    len: usize,
    /// len * size_of::<T>() (at least 1): where the slack starts.
    bytes: usize,
    /// Allocated in guard mode: its slack holds the canary.
    guarded: bool,
    class: usize,
    pool: Pool,
    _t: PhantomData<T>,
}

impl<T: DeviceRepr> Buf<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address, for kernel arguments.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// The device address of element `i` (`i <= len`).
    pub fn ptr_at(&self, i: usize) -> u64 {
        assert!(i <= self.len, "offset {i} past a buffer of {}", self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    fn device_block(&self) -> Option<&CudaSlice<u8>> {
        match self.raw.as_ref().expect("a live Buf holds its block") {
            Block::Device(raw) => Some(raw),
            Block::Host(_) => None,
        }
    }

    /// A typed read-only view of the buffer, for cudarc's copy functions (None for host
    /// blocks).
    pub(super) fn view(&self) -> Option<cudarc::driver::CudaView<'_, T>> {
        // SAFETY: the block holds at least len * size_of::<T>() bytes.
        self.device_block()
            .map(|raw| unsafe { raw.transmute::<T>(self.len) }.expect("block fits"))
    }

    /// A typed view of the buffer, for cudarc's copy functions (None for host blocks).
    pub(super) fn view_mut(&mut self) -> Option<cudarc::driver::CudaViewMut<'_, T>> {
        let len = self.len;
        match self.raw.as_mut().expect("a live Buf holds its block") {
            // SAFETY: the block holds at least len * size_of::<T>() bytes.
            Block::Device(raw) => Some(unsafe { raw.transmute_mut::<T>(len) }.expect("block fits")),
            Block::Host(_) => None,
        }
    }

    /// Copies `host` (exactly `len` elements) into the buffer, ordered on the pool's stream.
    pub fn copy_from(&mut self, host: &[T]) -> Result<()> {
        assert_eq!(
            host.len(),
            self.len,
            "copy of {} elements into a buffer of {}",
            host.len(),
            self.len
        );
        let stream = self.pool.inner.stream.clone();
        match (stream, self.view_mut()) {
            (Some(stream), Some(mut view)) => stream
                .memcpy_htod(host, &mut view)
                .map_err(|e| Error::cuda("copying to the device", e)),
            _ => {
                // SAFETY: a host block of at least len * size_of::<T>() bytes at self.ptr, not
                // aliased by `host`.
                unsafe {
                    std::ptr::copy_nonoverlapping(host.as_ptr(), self.ptr as *mut T, self.len)
                };
                Ok(())
            }
        }
    }

    /// Copies the buffer into `host` (exactly `len` elements), waiting for the stream.
    pub fn copy_to(&self, host: &mut [T]) -> Result<()> {
        assert_eq!(
            host.len(),
            self.len,
            "copy of a buffer of {} into {} elements",
            self.len,
            host.len()
        );
        match (self.pool.inner.stream.as_ref(), self.view()) {
            (Some(stream), Some(view)) => {
                stream
                    .memcpy_dtoh(&view, host)
                    .map_err(|e| Error::cuda("copying from the device", e))?;
                stream
                    .synchronize()
                    .map_err(|e| Error::cuda("waiting for a copy from the device", e))
            }
            _ => {
                // SAFETY: as in copy_from.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.ptr as *const T, host.as_mut_ptr(), self.len)
                };
                Ok(())
            }
        }
    }

    /// The buffer's contents on the host.
    pub fn to_vec(&self) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        let mut v = vec![T::default(); self.len];
        self.copy_to(&mut v)?;
        Ok(v)
    }
}

/// A typed range of device memory that kernels read: a whole [`Buf`], or a [`DevView`] of
/// part of one (a tensor inside the flat parameter buffer, say). Launchers take
/// `&impl DeviceSlice<T>` so that both work.
pub trait DeviceSlice<T> {
    /// The device address of element 0.
    fn ptr(&self) -> u64;
    /// Elements.
    fn len(&self) -> usize;
    /// Whether it holds no element.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device address of element `i` (`i <= len`).
    fn ptr_at(&self, i: usize) -> u64 {
        assert!(i <= self.len(), "offset {i} past a slice of {}", self.len());
        self.ptr() + (i * std::mem::size_of::<T>()) as u64
    }
}

/// A [`DeviceSlice`] that kernels may also write.
pub trait DeviceSliceMut<T>: DeviceSlice<T> {}

impl<T: DeviceRepr> DeviceSlice<T> for Buf<T> {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}
impl<T: DeviceRepr> DeviceSliceMut<T> for Buf<T> {}

/// Elements `range` of a [`Buf`], borrowed from it (read-only).
#[derive(Clone, Copy)]
pub struct DevView<'a, T> {
    ptr: u64,
    len: usize,
    _buf: PhantomData<&'a Buf<T>>,
}

/// Elements `range` of a [`Buf`], borrowed from it mutably.
pub struct DevViewMut<'a, T> {
    ptr: u64,
    len: usize,
    _buf: PhantomData<&'a mut Buf<T>>,
}

impl<T> DeviceSlice<T> for DevView<'_, T> {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}
impl<T> DeviceSlice<T> for DevViewMut<'_, T> {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}
impl<T> DeviceSliceMut<T> for DevViewMut<'_, T> {}

impl<T: DeviceRepr> Buf<T> {
    /// Elements `range` as a read-only slice for launchers.
    pub fn slice(&self, range: std::ops::Range<usize>) -> DevView<'_, T> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "slice {range:?} of a buffer of {}",
            self.len
        );
        DevView {
            ptr: self.ptr_at(range.start),
            len: range.len(),
            _buf: PhantomData,
        }
    }
    /// Elements `range` as a writable slice for launchers.
    pub fn slice_mut(&mut self, range: std::ops::Range<usize>) -> DevViewMut<'_, T> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "slice {range:?} of a buffer of {}",
            self.len
        );
        DevViewMut {
            ptr: self.ptr_at(range.start),
            len: range.len(),
            _buf: PhantomData,
        }
    }
}

impl<T> Drop for Buf<T> {
    fn drop(&mut self) {
        let pool = &self.pool;
        if self.guarded && !pool.slack_intact(self.ptr + self.bytes as u64, self.class - self.bytes)
        {
            pool.inner
                .counters
                .guard_violations
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(raw) = self.raw.take() {
            self.pool.give_back(self.class, raw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{size_class, Pool};

    #[test]
    fn slices_address_their_elements_and_refuse_to_overrun() {
        use super::DeviceSlice;
        let pool = Pool::host();
        let mut buf = pool.alloc::<f32>(100).unwrap();
        let base = buf.ptr();
        let v = buf.slice(10..30);
        assert_eq!(
            (DeviceSlice::ptr(&v), DeviceSlice::len(&v)),
            (base + 40, 20)
        );
        assert_eq!(v.ptr_at(20), base + 120);
        let m = buf.slice_mut(99..100);
        assert_eq!((m.ptr(), m.len()), (base + 396, 1));
        assert!(
            std::panic::catch_unwind(|| pool.alloc::<f32>(4).unwrap().slice(2..5).len()).is_err()
        );
    }

    #[test]
    fn guard_mode_catches_a_write_past_the_end_and_nothing_else() {
        let pool = Pool::host();
        pool.set_guard(true);
        let mut inside = pool.alloc::<f32>(1000).unwrap();
        inside.copy_from(&vec![1.0; 1000]).unwrap();
        drop(inside);
        assert_eq!(pool.stats().guard_violations, 0);
        let past = pool.alloc::<f32>(1000).unwrap();
        // SAFETY: element 1000 is in the block's slack (4000 bytes round up to 4096).
        unsafe { *(past.ptr_at(1000) as *mut f32) = 2.0 };
        drop(past);
        assert_eq!(pool.stats().guard_violations, 1);
        // Buffers allocated with the guard off are not judged.
        pool.set_guard(false);
        let unguarded = pool.alloc::<f32>(1000).unwrap();
        // SAFETY: as above.
        unsafe { *(unguarded.ptr_at(1000) as *mut f32) = 2.0 };
        drop(unguarded);
        assert_eq!(pool.stats().guard_violations, 1);
        assert_eq!(pool.stats().mallocs, 1, "one block, reused");
    }

    #[test]
    fn size_classes_round_up_and_cover_the_request() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(257), 512);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
        assert_eq!(size_class((2 << 20) + 1), 4 << 20);
        for bytes in [3usize, 1000, 123_456, 5_000_000, 77_777_777] {
            let c = size_class(bytes);
            assert!(c >= bytes && (c <= 2 * bytes.max(256) || c - bytes < 2 << 20));
        }
    }

    /// A step whose head-row count changes every time (as the matched rows do) must not
    /// grow the cache: the blocks of earlier steps serve later ones within REUSE_SLACK.
    #[test]
    fn varying_sizes_reuse_the_cache_instead_of_growing_it() {
        let pool = Pool::host();
        const MIB: usize = 1 << 20;
        // Rows 300..=340 of 64 KiB each (bf16 logits of K = 32768), 40 "steps".
        for step in 0..40usize {
            let rows = 300 + (step * 7) % 41;
            let a = pool.alloc::<u16>(rows * 32768).unwrap();
            let b = pool.alloc::<u16>(rows * 32768).unwrap();
            drop((a, b));
        }
        let s = pool.stats();
        // Two live buffers of at most 340 * 64 KiB = 21.25 MiB each; allow one extra block
        // pair for the classes below the first reuse window.
        assert!(
            s.bytes_allocated <= 4 * 22 * MIB as u64,
            "cache grew to {} bytes over 40 steps ({} mallocs)",
            s.bytes_allocated,
            s.mallocs
        );
        assert!(s.reuses >= 70, "{s:?}");
        assert_eq!(s.bytes_in_use, 0);
        assert!(s.peak_in_use >= 2 * 340 * 32768 * 2 && s.peak_in_use <= 2 * 24 * MIB as u64);
    }

    #[test]
    fn reuse_takes_the_smallest_block_that_fits_and_never_a_smaller_one() {
        let pool = Pool::host();
        const MIB: usize = 1 << 20;
        let big = pool.alloc::<u8>(40 * MIB).unwrap();
        let mid = pool.alloc::<u8>(34 * MIB).unwrap();
        drop((big, mid));
        // 32 MiB may take 34 (within 1/8) but not 40; it must take the smallest.
        let b = pool.alloc::<u8>(32 * MIB).unwrap();
        assert_eq!(pool.stats().mallocs, 2);
        assert_eq!(b.class, 34 * MIB);
        // 36 MiB fits neither 34 (too small) nor 40 (1/8 of 36 is 4.5: 40 is inside).
        let c = pool.alloc::<u8>(36 * MIB).unwrap();
        assert_eq!((c.class, pool.stats().mallocs), (40 * MIB, 2));
        // 20 MiB may not take a 40 MiB block: a new one.
        drop(c);
        let d = pool.alloc::<u8>(20 * MIB).unwrap();
        assert_eq!((d.class, pool.stats().mallocs), (20 * MIB, 3));
        drop((b, d));
        assert_eq!(
            pool.release_cache().unwrap(),
            (34 + 40 + 20) as u64 * MIB as u64
        );
        let s = pool.stats();
        assert_eq!(
            (s.bytes_allocated, s.bytes_in_use, s.cache_releases),
            (0, 0, 1)
        );
        assert_eq!(s.peak_in_use, (40 + 34) as u64 * MIB as u64);
    }
}
