//! The CUDA backend on a machine without a GPU (CI's): the kernels are in the binary, and
//! every GPU command says clearly that there is no device, with its own exit status.
//! On a GPU machine the parity checks themselves run through `check-kernels`
//! (scripts/gpu-check.sh); these tests then skip, saying so.

mod common;

use common::run;

/// Exit status for "no usable GPU" (src/gpu_cmd.rs).
const EXIT_NO_CUDA: i32 = 3;

fn has_gpu() -> bool {
    let out = run(&["kernels"]);
    String::from_utf8_lossy(&out.stdout).contains("a CUDA device is available")
}

#[test]
fn kernels_reports_every_module_when_the_toolchain_is_installed() {
    let out = run(&["kernels"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    if std::env::var_os("PWSELF_REQUIRE_KERNELS").is_none() && text.contains("no kernels") {
        eprintln!(
            "skipped: built without nvcc (scripts/test.sh installs it and requires the kernels)"
        );
        return;
    }
    assert!(text.contains("kernels compiled by"), "{text}");
    // Every kernels/*.cu (the GEMMs are cuBLASLt's: no file of ours).
    for module in ["attention", "ce", "layers", "optim", "views"] {
        assert!(
            text.contains(&format!("== {module}.cu (sm_90)")),
            "no sm_90 report for {module}.cu:\n{text}"
        );
        assert!(
            text.contains(&format!("== {module}.cu (sm_80)")),
            "no sm_80 report for {module}.cu:\n{text}"
        );
    }
    assert!(text.contains("registers"), "{text}");
}

#[test]
fn check_kernels_without_a_gpu_says_so_with_its_own_exit_status() {
    if has_gpu() {
        eprintln!("skipped: this machine has a GPU (run check-kernels itself)");
        return;
    }
    let out = run(&["check-kernels"]);
    assert_eq!(out.status.code(), Some(EXIT_NO_CUDA));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no CUDA device"), "{err}");
}

#[test]
fn bench_and_train_on_cuda_without_a_gpu_say_so() {
    if has_gpu() {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let out = run(&["bench", "--device", "cuda"]);
    assert_eq!(out.status.code(), Some(EXIT_NO_CUDA));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CUDA device"));

    let out = run(&["train", "--device", "cuda", "--max-steps", "1"]);
    assert_eq!(out.status.code(), Some(EXIT_NO_CUDA));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CUDA device"));

    let out = run(&["bench", "--device", "cpu"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cargo bench"));
}

/// Every kernel against its CPU twin on the CPU emulator: the kernels' logic (indexing,
/// reductions, barriers, what is written where) checked on every CI run, without a GPU.
#[test]
fn every_kernel_matches_its_cpu_twin_on_the_emulator() {
    let out = run(&["check-kernels", "--emulate"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if std::env::var_os("PWSELF_REQUIRE_KERNELS").is_none() && err.contains("no kernel emulator") {
        eprintln!("skipped: built without a C++ compiler (scripts/test.sh requires the emulator)");
        return;
    }
    assert!(
        out.status.success(),
        "check-kernels --emulate failed:\n{text}\n{err}"
    );
    assert!(text.contains(" passed, 0 failed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}
