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
//!
//! Independently of nvcc, when a C++ compiler is found, every `.cu` is also compiled as plain
//! C++ against `kernels/emu/cuda_emu.h` into the CPU emulator (`check-kernels --emulate`),
//! and `cfg(pwself_emu)` is set.

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

    println!("cargo::rustc-check-cfg=cfg(pwself_emu)");
    println!("cargo:rerun-if-env-changed=CXX");
    println!("cargo:rerun-if-env-changed=PWSELF_REQUIRE_KERNELS");
    if cxx_works() {
        match build_emulator(&kernels, &sources, &out) {
            Ok(()) => println!("cargo:rustc-cfg=pwself_emu"),
            // CI (scripts/test.sh) sets PWSELF_REQUIRE_KERNELS: there a kernel the emulator
            // cannot compile fails the build; elsewhere the build goes on without it.
            Err(e) if env::var_os("PWSELF_REQUIRE_KERNELS").is_some() => {
                panic!("the kernel emulator does not compile: {e}")
            }
            Err(e) => println!("cargo:warning=kernel emulator not built (check-kernels --emulate unavailable): {e}"),
        }
    } else {
        println!("cargo:warning=no C++ compiler: the CUDA kernel emulator (check-kernels --emulate) is not built");
    }
}

fn cxx_works() -> bool {
    let cxx = env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    Command::new(cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The `extern "C"` kernels of a source: the identifier before the `(` of every
/// `extern "C" ... __global__ ... name(`.
fn kernel_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in text.match_indices("extern \"C\"") {
        // Inside a #define the name is a macro parameter: such kernels cannot be found here
        // (the PTX cross-check in build_emulator reports them).
        let line_end = text[at..].find('\n').map_or(text.len(), |e| at + e);
        if text[..line_end].trim_end().ends_with('\\') {
            continue;
        }
        let rest = &text[at..];
        // The name is the identifier before the first `(` that does not open an attribute
        // such as __launch_bounds__(256).
        let mut from = 0;
        let name = loop {
            let Some(p) = rest[from..].find('(').map(|p| p + from) else {
                break None;
            };
            let head = &rest[..p];
            if head.contains(';') || head.contains('{') {
                break None;
            }
            let ident: String = head
                .trim_end()
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if ident.starts_with("__") && ident.ends_with("__") {
                match rest[p..].find(')') {
                    Some(close) => from = p + close + 1,
                    None => break None,
                }
                continue;
            }
            break head.contains("__global__").then_some(ident);
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.push(name);
        }
    }
    names
}

/// `extern __shared__ [__align__(n)] T name[];` becomes a pointer to the emulator's dynamic
/// shared memory (C++ has no such declaration).
fn rewrite_dynamic_shared(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(decl) = t.strip_prefix("extern __shared__") {
            let decl = decl.split(';').next().unwrap_or("").trim();
            let decl = match decl.strip_prefix("__align__(") {
                Some(r) => r.split_once(')').map_or(decl, |(_, r)| r.trim()),
                None => decl,
            };
            if let Some(open) = decl.rfind('[') {
                let (ty_name, _) = decl.split_at(open);
                let ty_name = ty_name.trim();
                if let Some(sp) = ty_name.rfind(|c: char| c.is_whitespace() || c == '*') {
                    let (ty, name) = ty_name.split_at(sp + 1);
                    let _ = writeln!(
                        out,
                        "{ty}* {name} = reinterpret_cast<{ty}*>(::emu::dynamic_shared());",
                        ty = ty.trim(),
                        name = name.trim()
                    );
                    continue;
                }
            }
            panic!("kernels: cannot emulate the declaration `{t}`: write it as `extern __shared__ T name[];`");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn build_emulator(kernels: &Path, sources: &[PathBuf], out: &Path) -> Result<(), String> {
    let emu_dir = out.join("emu");
    fs::create_dir_all(&emu_dir).expect("create $OUT_DIR/emu");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .flag("-w")
        .flag("-fno-strict-aliasing")
        .include(kernels.join("emu"))
        .include(kernels);
    let mut all_names: Vec<(String, String)> = Vec::new();
    let mut register_all = String::from("extern \"C\" {\n");
    let mut calls = String::new();
    for src in sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 kernel name");
        let text =
            fs::read_to_string(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
        let names = kernel_names(&text);
        for n in &names {
            if let Some((_, other)) = all_names.iter().find(|(m, _)| m == n) {
                return Err(format!(
                    "kernel {n} is defined in both {other}.cu and {stem}.cu: kernel names must be unique"
                ));
            }
            all_names.push((n.clone(), stem.to_string()));
        }
        // Every kernel nvcc compiled must be registered with the emulator, which takes each
        // kernel's block-size limit from the PTX (.maxntid, from __launch_bounds__).
        let mut max_threads: Vec<(String, u32)> = Vec::new();
        if let Ok(ptx) = fs::read_to_string(out.join("ptx").join(format!("{stem}.sm_90.ptx"))) {
            let mut current: Option<String> = None;
            for line in ptx.lines().map(str::trim) {
                if let Some(entry) = line.strip_prefix(".visible .entry ") {
                    let entry = entry.split('(').next().unwrap_or("").trim().to_string();
                    if !names.contains(&entry) {
                        return Err(format!(
                            "kernel {entry} of {stem}.cu is not written as `extern \"C\" __global__ void {entry}(` \
                             outside a macro, so the emulator cannot register it"
                        ));
                    }
                    current = Some(entry);
                } else if let (Some(dims), Some(entry)) = (line.strip_prefix(".maxntid "), &current)
                {
                    let product = dims
                        .split(',')
                        .map(|d| d.trim().parse::<u32>().unwrap_or(1))
                        .product();
                    max_threads.push((entry.clone(), product));
                } else if line.starts_with('{') {
                    current = None;
                }
            }
        }
        let mut unit = format!(
            "#include \"cuda_emu.h\"\n#line 1 \"{}\"\n{}\n",
            src.display(),
            rewrite_dynamic_shared(&text)
        );
        let _ = writeln!(unit, "extern \"C\" void pwself_emu_register_{stem}() {{");
        for n in &names {
            let limit = max_threads
                .iter()
                .find(|(m, _)| m == n)
                .map_or(1024, |(_, t)| *t);
            let _ = writeln!(unit, "    EMU_REGISTER({n}, {limit})");
        }
        unit.push_str("}\n");
        let path = emu_dir.join(format!("{stem}.cpp"));
        fs::write(&path, unit).expect("write emulator unit");
        build.file(&path);
        let _ = writeln!(register_all, "void pwself_emu_register_{stem}();");
        let _ = writeln!(calls, "    pwself_emu_register_{stem}();");
    }
    let _ = write!(
        register_all,
        "void pwself_emu_register_all() {{\n{calls}}}\n}}\n"
    );
    let reg = emu_dir.join("register_all.cpp");
    fs::write(&reg, register_all).expect("write emulator registry");
    build.file(&reg);
    build.file(kernels.join("emu/emu_runtime.cpp"));
    build.try_compile("pwself_emu").map_err(|e| e.to_string())
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
            .rfind(|s| !s.is_empty())
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
