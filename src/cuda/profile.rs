//! Where a step's GPU time goes: while profiling is on ([`Gpu::profile_start`]), every kernel
//! launch and every cuBLASLt GEMM is bracketed by two timing events on the compute stream
//! (no host synchronisation added, so the step runs as it does unprofiled, less the events'
//! small cost); [`Gpu::profile_take`] waits for the stream and sums the time per kernel.
//! Under the CPU emulator the spans are host wall time (meaningless as GPU timings; it checks
//! the code path).

use std::sync::Mutex;
use std::time::Instant;

use cudarc::driver::{sys, CudaEvent, CudaStream};
use serde::Serialize;

use crate::error::{Error, Result};

/// One bracketed launch.
pub(crate) enum Span {
    /// A device launch: the events recorded before and after it.
    Device(&'static str, CudaEvent, CudaEvent),
    /// An emulated launch: its host time in milliseconds.
    Host(&'static str, f64),
}

/// The spans recorded while profiling is on; `None` when it is off.
#[derive(Default)]
pub(crate) struct Profiler {
    spans: Mutex<Option<Vec<Span>>>,
}

/// The start of a span (see [`Profiler::begin`]).
pub(crate) enum Begin {
    Off,
    Device(CudaEvent),
    Host(Instant),
}

fn event_err(e: impl std::fmt::Display) -> Error {
    Error::cuda("recording a profiling event", e)
}

impl Profiler {
    fn on(&self) -> bool {
        self.spans.lock().map(|s| s.is_some()).unwrap_or(false)
    }

    /// Starts a span on `stream` (or on the host under the emulator), if profiling is on.
    pub(crate) fn begin(&self, stream: Option<&CudaStream>) -> Result<Begin> {
        if !self.on() {
            return Ok(Begin::Off);
        }
        Ok(match stream {
            Some(s) => Begin::Device(
                s.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(event_err)?,
            ),
            None => Begin::Host(Instant::now()),
        })
    }

    /// Ends the span `begin` started, naming it `what`.
    pub(crate) fn end(
        &self,
        begin: Begin,
        stream: Option<&CudaStream>,
        what: &'static str,
    ) -> Result<()> {
        let span = match (begin, stream) {
            (Begin::Off, _) => return Ok(()),
            (Begin::Device(start), Some(s)) => {
                let end = s
                    .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(event_err)?;
                Span::Device(what, start, end)
            }
            (Begin::Host(t), _) => Span::Host(what, t.elapsed().as_secs_f64() * 1e3),
            (Begin::Device(_), None) => unreachable!("a device span ends on its stream"),
        };
        if let Ok(mut spans) = self.spans.lock() {
            if let Some(v) = spans.as_mut() {
                v.push(span);
            }
        }
        Ok(())
    }

    /// Turns recording on (dropping anything recorded before).
    pub(crate) fn start(&self) {
        if let Ok(mut s) = self.spans.lock() {
            *s = Some(Vec::new());
        }
    }

    /// Turns recording off and returns the spans.
    pub(crate) fn take(&self) -> Vec<Span> {
        self.spans
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .unwrap_or_default()
    }
}

/// One kernel's total over the profiled work.
#[derive(Clone, Debug, Serialize)]
pub struct KernelTime {
    /// `module::kernel`, or `cublasLt gemm`.
    pub name: String,
    /// Launches.
    pub calls: usize,
    /// Total milliseconds.
    pub ms: f64,
    /// Share of the summed kernel time.
    pub share: f64,
}

/// Sums `spans` per name (the stream must be idle), largest first.
pub(crate) fn summarise(spans: Vec<Span>) -> Result<Vec<KernelTime>> {
    let mut by: Vec<KernelTime> = Vec::new();
    for s in spans {
        let (name, ms) = match s {
            Span::Device(n, a, b) => (n, f64::from(a.elapsed_ms(&b).map_err(event_err)?)),
            Span::Host(n, ms) => (n, ms),
        };
        match by.iter_mut().find(|k| k.name == name) {
            Some(k) => {
                k.calls += 1;
                k.ms += ms;
            }
            None => by.push(KernelTime {
                name: name.to_string(),
                calls: 1,
                ms,
                share: 0.0,
            }),
        }
    }
    let total: f64 = by.iter().map(|k| k.ms).sum();
    for k in &mut by {
        k.share = if total > 0.0 { k.ms / total } else { 0.0 };
    }
    by.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(by)
}
