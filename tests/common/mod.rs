//! Helpers shared by the integration tests that run the built binary.
#![allow(dead_code)] // each test crate uses its own subset

use std::process::{Command, Output};

/// Runs `pwself-engine ARGS` without backtraces.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pwself-engine"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Asserts that `pwself-engine ARGS` fails cleanly: non-zero exit, no panic, and stderr
/// mentioning every string of `must_mention` (the flag or file at fault and the fix).
pub fn refused(args: &[&str], must_mention: &[&str]) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for m in must_mention {
        assert!(
            err.contains(m),
            "{args:?}: stderr should mention {m:?}: {err}"
        );
    }
}
