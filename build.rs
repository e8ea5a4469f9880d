//! Compiles `kernels/*.cu` to PTX with nvcc, for compute_90 (Hopper, what the GPU machines
//! have) and compute_80 (Ampere), runs `ptxas -v` on every PTX, and writes
//! `$OUT_DIR/kernels.rs`, which `src/cuda/ptx.rs` includes: the PTX of every module, the
//! ptxas resource report, and how nvcc was found (or why it was not).
//!
//! nvcc is looked for in `$NVCC`, then on `PATH`, then in `.cuda-toolchain/` (what
//! `scripts/install-cuda-toolchain.sh` installs). Without nvcc the crate still builds, with no
//! kernels: the CUDA backend then says how to get them. A kernel that fails to compile or to
//! assemble, or that spills registers to local memory, fails the build.
//!
//! A `.cu` file may pass extra nvcc flags on a line `// nvcc-flags: ...` among its first ten.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (PTX target, ptxas target, suffix of the embedded constant).
const ARCHS: [(&str, &str); 2] = [("compute_90", "sm_90"), ("compute_80", "sm_80")];

fn main() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = root.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels)
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();

    let generated = match find_nvcc(&root) {
        None => not_built(
            "this binary was built without nvcc: run scripts/install-cuda-toolchain.sh, \
             then cargo build again (or set NVCC to an nvcc 13.0)",
        ),
        Some(nvcc) => {
            let version = tool_version(&nvcc);
            let ptxas = nvcc.with_file_name("ptxas");
            build_all(&nvcc, &ptxas, &sources, &out, &version)
        }
    };
    fs::write(out.join("kernels.rs"), generated).expect("write $OUT_DIR/kernels.rs");
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            panic!(
                "NVCC={} is not a file: unset it or point it at nvcc",
                p.display()
            );
        }
        return Some(p);
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let local = root.join(".cuda-toolchain/nvidia/cu13/bin/nvcc");
    local.is_file().then_some(local)
}

fn tool_version(tool: &Path) -> String {
    let out = Command::new(tool)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let release = text
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown release")
        .trim()
        .to_string();
    format!("{} ({release})", tool.display())
}

fn not_built(reason: &str) -> String {
    println!("cargo:warning=CUDA kernels not built: {reason}");
    format!(
        "pub const NVCC: Option<&str> = None;\n\
         pub const NOT_BUILT: &str = {reason:?};\n\
         pub static MODULES: &[PtxModule] = &[];\n\
         pub const PTXAS_REPORT: &str = \"\";\n"
    )
}

fn extra_flags(src: &Path) -> Vec<String> {
    let text = fs::read_to_string(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    text.lines()
        .take(10)
        .find_map(|l| l.trim().strip_prefix("// nvcc-flags:"))
        .map(|f| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn build_all(nvcc: &Path, ptxas: &Path, sources: &[PathBuf], out: &Path, version: &str) -> String {
    let ptx_dir = out.join("ptx");
    fs::create_dir_all(&ptx_dir).expect("create $OUT_DIR/ptx");
    // Every (source, arch) compiles on its own thread: nvcc is single-threaded.
    let jobs: Vec<(PathBuf, &str, &str)> = sources
        .iter()
        .flat_map(|s| ARCHS.iter().map(move |&(c, sm)| (s.clone(), c, sm)))
        .collect();
    let reports: Vec<(String, String, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(src, compute, sm)| {
                let ptx_dir = &ptx_dir;
                scope.spawn(move || {
                    let stem = src
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .expect("utf-8 kernel name");
                    let ptx = ptx_dir.join(format!("{stem}.{sm}.ptx"));
                    compile(nvcc, src, compute, &ptx);
                    let report = assemble(ptxas, &ptx, sm);
                    (stem.to_string(), sm.to_string(), report)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("kernel build thread"))
            .collect()
    });

    let mut report = String::new();
    let mut spills = Vec::new();
    for (stem, sm, text) in &reports {
        let _ = writeln!(report, "== {stem}.cu ({sm})");
        for f in parse_ptxas(text) {
            let _ = writeln!(
                report,
                "  {:<40} {:>3} registers {:>6} B shared {:>5} B stack {:>4} B spilled",
                f.name, f.registers, f.shared, f.stack, f.spill
            );
            if f.spill > 0 {
                spills.push(format!("{} ({sm}): {} bytes", f.name, f.spill));
            }
        }
    }
    fs::write(out.join("ptxas-report.txt"), &report).expect("write ptxas report");
    if !spills.is_empty() {
        panic!(
            "kernels spill registers to local memory (slow): {}\n{report}",
            spills.join(", ")
        );
    }

    let mut code = format!(
        "pub const NVCC: Option<&str> = Some({version:?});\n\
         pub const NOT_BUILT: &str = \"\";\n\
         pub const PTXAS_REPORT: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/ptxas-report.txt\"));\n\
         pub static MODULES: &[PtxModule] = &[\n"
    );
    for src in sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 kernel name");
        let _ = writeln!(
            code,
            "    PtxModule {{ name: {stem:?}, sm_90: include_str!(concat!(env!(\"OUT_DIR\"), \"/ptx/{stem}.sm_90.ptx\")), \
             sm_80: include_str!(concat!(env!(\"OUT_DIR\"), \"/ptx/{stem}.sm_80.ptx\")) }},"
        );
    }
    code.push_str("];\n");
    code
}

fn compile(nvcc: &Path, src: &Path, compute: &str, ptx: &Path) {
    let out = Command::new(nvcc)
        .args(["-ptx", "-std=c++17", "-O3", "-lineinfo"])
        .arg(format!("-arch={compute}"))
        .args(extra_flags(src))
        .arg("-I")
        .arg(src.parent().expect("kernel in kernels/"))
        .arg("-o")
        .arg(ptx)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    if !out.status.success() {
        panic!(
            "nvcc failed on {} ({compute}):\n{}{}",
            src.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn assemble(ptxas: &Path, ptx: &Path, sm: &str) -> String {
    let out = Command::new(ptxas)
        .arg(format!("-arch={sm}"))
        .arg("-v")
        .arg(ptx)
        .arg("-o")
        .arg(ptx.with_extension("cubin"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.display()));
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        panic!("ptxas failed on {} ({sm}):\n{text}", ptx.display());
    }
    // The cubin only proves that the PTX assembles; the PTX is what ships.
    let _ = fs::remove_file(ptx.with_extension("cubin"));
    text
}

struct FunctionResources {
    name: String,
    registers: u32,
    shared: u32,
    stack: u32,
    spill: u32,
}

/// Reads ptxas -v output: "Compiling entry function 'X'", then "N bytes stack frame, N bytes
/// spill stores, ...", then "Used N registers, ... N bytes smem".
fn parse_ptxas(text: &str) -> Vec<FunctionResources> {
    let mut all: Vec<FunctionResources> = Vec::new();
    let number_before = |line: &str, word: &str| -> u32 {
        let at = match line.find(word) {
            Some(at) => at,
            None => return 0,
        };
        line[..at]
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("?").to_string();
            all.push(FunctionResources {
                name,
                registers: 0,
                shared: 0,
                stack: 0,
                spill: 0,
            });
        } else if let Some(f) = all.last_mut() {
            if line.contains("bytes stack frame") {
                f.stack = number_before(line, "bytes stack frame");
                f.spill = number_before(line, "bytes spill stores")
                    .max(number_before(line, "bytes spill loads"));
            } else if line.contains("Used") && line.contains("registers") {
                f.registers = number_before(line, "registers");
                f.shared = number_before(line, "bytes smem");
            }
        }
    }
    all
}
