//! Reliability of `pwself-engine train` (issue 7), through the built binary: SIGKILL at
//! random moments and inside checkpoint writes, each time resumed, ends bit-identical to
//! an uninterrupted run; a checkpoint that cannot be written (file size limit, full
//! tmpfs, read-only folder) stops the run with the previous checkpoint intact; injected
//! NaNs skip steps without changing anything, name the tensor, and ten in a row stop the
//! run; damaged, foreign and future checkpoints are refused or skipped with the file and
//! the fix.
//!
//! Test hooks (environment variables read by the binary, test-only):
//! `PWSELF_TEST_SLOW_CHECKPOINT=MS` sleeps before each rename of a checkpoint write;
//! `PWSELF_TEST_NAN_STEPS=3,4:loss,5:TENSOR` makes those steps' gradient or loss NaN.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use pwself_engine::checkpoint;
use pwself_engine::data::{default_pack, PackWriter, Split};

const BIN: &str = env!("CARGO_BIN_EXE_pwself-engine");

/// 64 images of the embedded training split (4 steps of 16 per epoch) and a small model.
struct Setup {
    dir: tempfile::TempDir,
    pack: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let full = default_pack(Split::Train).unwrap();
        let pack = dir.path().join("64.pwpack");
        let mut w = PackWriter::create(&pack, 28, 28, 1, full.class_names()).unwrap();
        for i in 0..64 {
            w.push(full.image(i), full.label(i)).unwrap();
        }
        w.finish().unwrap();
        Setup { dir, pack }
    }

    /// A configuration file: depth-2 femto (or `depth`), 2 + 4 views, a small head.
    fn config(&self, depth: usize, epochs: usize) -> PathBuf {
        let path = self.dir.path().join(format!("d{depth}-e{epochs}.toml"));
        let text = format!(
            "[model]\ndepth = {depth}\n[views]\nlocal_views = 4\n[head]\nhidden = 64\nbottleneck = 32\n\
             out_dim = 128\n[run]\nbatch = 16\nepochs = {epochs}\n[optim]\nwarmup_epochs = 0\nlr = 0.02\n"
        );
        fs::write(&path, text).unwrap();
        path
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `train` on the pack into `out`, with `extra` arguments and environment.
    fn command(&self, config: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(BIN);
        c.args(["train", "--device", "cpu", "--threads", "1", "--config"])
            .arg(config)
            .arg("--data")
            .arg(&self.pack)
            .arg("--out")
            .arg(out)
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .env_remove("PWSELF_TEST_SLOW_CHECKPOINT")
            .env_remove("PWSELF_TEST_NAN_STEPS");
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    fn train(&self, config: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(config, out, extra, env).output().unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn succeeded(o: &Output) {
    assert!(o.status.success(), "train failed: {}", stderr(o));
}

/// Every tensor of a checkpoint file, and the AdamW step counts, by name.
fn tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    checkpoint::verify(path, &bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, Vec<u8>> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    for key in ["adam_step", "adam_step_last_layer"] {
        map.insert(format!("meta.{key}"), meta[key].as_bytes().to_vec());
    }
    map
}

fn step_of(path: &Path) -> u64 {
    let bytes = fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().as_ref().unwrap()["step"].parse().unwrap()
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    assert!(ta.len() > 10, "only {} tensors", ta.len());
    for (name, bytes) in &ta {
        assert!(
            bytes == &tb[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn has_checkpoint(dir: &Path) -> bool {
    dir.exists()
        && names_in(dir)
            .iter()
            .any(|n| n.starts_with("checkpoint") && n.ends_with(".safetensors"))
}

/// splitmix64: the kill schedule's random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Where a kill is aimed.
#[derive(Clone, Copy, Debug)]
enum Aim {
    /// A random moment of the process's life.
    Random(Duration),
    /// While a step file's temporary is being written or waits for its rename.
    StepFileWrite,
    /// After the step file is renamed, before `checkpoint.safetensors` points at it.
    LatestLink,
}

/// Waits until `dir` holds a file that `hit` accepts, or the child exits; then SIGKILL.
/// Returns the exit status if the child exited on its own, `None` if it was killed.
fn kill_when(
    child: &mut Child,
    dir: &Path,
    deadline: Duration,
    hit: impl Fn(&str) -> bool,
) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        let seen = dir.exists() && names_in(dir).iter().any(|n| hit(n));
        if seen || t0.elapsed() > deadline {
            let killed = Command::new("kill")
                .args(["-9", &child.id().to_string()])
                .status()
                .unwrap();
            let status = child.wait().unwrap();
            // The child may have finished between the check and the signal.
            return (!killed.success() || status.success()).then_some(status);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGKILLs a 12-epoch run (48 steps) `kills` times, a third of them at random moments
/// and two thirds inside checkpoint writes, resuming from the run directory each time;
/// then finishes the run and compares it with an uninterrupted one, bit for bit.
fn kill_and_resume(kills: usize, seed: u64) {
    let s = Setup::new();
    let cfg = s.config(2, 12);
    let reference = s.out("reference");
    let t0 = Instant::now();
    succeeded(&s.train(&cfg, &reference, &[], &[]));
    let life = t0.elapsed();
    eprintln!("uninterrupted run: {:.1} s", life.as_secs_f64());

    let out = s.out("killed");
    let log = s.out("stderr.txt");
    let mut rng = Rng(seed);
    let (mut done, mut resumes, mut completed) = (0usize, 0usize, 0usize);
    let mut aims = Vec::new();
    while done < kills {
        let resume = has_checkpoint(&out);
        let extra: Vec<&str> = if resume {
            vec!["--resume", out.to_str().unwrap()]
        } else {
            Vec::new()
        };
        let aim = match rng.below(3) {
            // Up to about two epochs of the process's life.
            0 => Aim::Random(Duration::from_millis(
                rng.below(life.as_millis() as u64 / 6 + 1),
            )),
            1 => Aim::StepFileWrite,
            _ => Aim::LatestLink,
        };
        let slow = [("PWSELF_TEST_SLOW_CHECKPOINT", "150")];
        let env: &[(&str, &str)] = match aim {
            Aim::Random(_) => &[],
            _ => &slow,
        };
        let mut child = s
            .command(&cfg, &out, &extra, env)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let before = names_in_or_empty(&out);
        let own_temp = format!(".tmp-{}", child.id());
        let exited = match aim {
            Aim::Random(after) => kill_when(&mut child, &out, after, |_| false),
            Aim::StepFileWrite => kill_when(&mut child, &out, life * 2, |n| {
                n.starts_with(".checkpoint-step") && n.ends_with(&own_temp)
            }),
            Aim::LatestLink => kill_when(&mut child, &out, life * 2, |n| {
                n.starts_with("checkpoint-step") && !before.iter().any(|b| b == n)
            }),
        };
        let text = fs::read_to_string(&log).unwrap();
        eprintln!(
            "life {}: {aim:?}, resume {resume}, exited {exited:?}; {:?}; {}",
            done + 1,
            names_in_or_empty(&out),
            text.trim()
        );
        assert!(
            !text.contains("error") && !text.contains("panicked"),
            "life {} ({aim:?}, resume {resume}) failed: {text}",
            done + 1
        );
        resumes += usize::from(resume);
        match exited {
            Some(status) => {
                // Finished before the kills were all spent: check it, start again.
                assert!(status.success(), "{status}: {text}");
                check_finished(&reference, &out);
                completed += 1;
                fs::remove_dir_all(&out).unwrap();
            }
            None => {
                done += 1;
                aims.push(aim);
            }
        }
    }
    // The last life may have died before its first checkpoint: then start afresh.
    let resume = ["--resume", out.to_str().unwrap()];
    let extra: &[&str] = if has_checkpoint(&out) { &resume } else { &[] };
    succeeded(&s.train(&cfg, &out, extra, &[]));
    check_finished(&reference, &out);
    eprintln!(
        "{done} kills ({} random, {} in step-file writes, {} in the link), {resumes} resumes, \
         {} runs finished, {:.1} s",
        aims.iter().filter(|a| matches!(a, Aim::Random(_))).count(),
        aims.iter()
            .filter(|a| matches!(a, Aim::StepFileWrite))
            .count(),
        aims.iter().filter(|a| matches!(a, Aim::LatestLink)).count(),
        completed + 1,
        t0.elapsed().as_secs_f64()
    );
}

/// The run in `out` ended at step 48 with the reference's tensors, the last three step
/// files kept and no temporary file left.
fn check_finished(reference: &Path, out: &Path) {
    assert_eq!(step_of(&out.join("checkpoint.safetensors")), 48);
    assert_same_tensors(
        &reference.join("checkpoint.safetensors"),
        &out.join("checkpoint.safetensors"),
    );
    // The last three step files are kept, the newest is `checkpoint.safetensors`.
    let names = names_in(out);
    for step in [40, 44, 48] {
        assert!(
            names.contains(&checkpoint::step_file_name(step)),
            "{names:?}"
        );
    }
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("checkpoint-step"))
            .count(),
        3,
        "{names:?}"
    );
}

fn names_in_or_empty(dir: &Path) -> Vec<String> {
    if dir.exists() {
        names_in(dir)
    } else {
        Vec::new()
    }
}

#[test]
fn twenty_sigkills_each_resumed_end_bit_identical() {
    kill_and_resume(20, 7);
}

#[test]
#[ignore = "long: 100 kills (minutes in the debug profile)"]
fn a_hundred_sigkills_each_resumed_end_bit_identical() {
    kill_and_resume(100, 11);
}

/// Trains 1 epoch into `out`, then resumes for a second with `wrap` around the command
/// (a shell that limits it); the resumed run's first checkpoint write must fail.
fn second_checkpoint_fails(s: &Setup, out: &Path, run: impl FnOnce(Command) -> Output) -> String {
    let cfg = s.config(2, 2);
    succeeded(&s.train(&cfg, out, &["--max-steps", "4"], &[]));
    let before = fs::read(out.join("checkpoint.safetensors")).unwrap();
    let o = run(s.command(&cfg, out, &["--resume", out.to_str().unwrap()], &[]));
    let err = stderr(&o);
    assert!(!o.status.success(), "the run should stop: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("checkpoint-step00000008.safetensors")
            && err.contains("cannot write the checkpoint of step 8")
            && err.contains("os error")
            && err.contains("checkpoint.safetensors (step 4) is intact")
            && err.contains("--resume"),
        "{err}"
    );
    // The previous checkpoint: the same bytes, still valid; no partial file left.
    assert_eq!(
        fs::read(out.join("checkpoint.safetensors")).unwrap(),
        before
    );
    assert_eq!(step_of(&out.join("checkpoint.safetensors")), 4);
    let names = names_in(out);
    assert!(
        !names
            .iter()
            .any(|n| n.contains(".tmp-") || n.contains("step00000008")),
        "{names:?}"
    );
    err
}

#[test]
fn a_checkpoint_larger_than_the_file_size_limit_stops_the_run_cleanly() {
    // RLIMIT_FSIZE (`ulimit -f`, in 512- or 1024-byte blocks by shell) below a quarter of
    // the checkpoint: the write fails with EFBIG, as root too. SIGXFSZ is ignored so that
    // the write returns the error instead of killing the process.
    let s = Setup::new();
    let out = s.out("limited");
    let err = second_checkpoint_fails(&s, &out, |c| {
        let size = fs::metadata(out.join("checkpoint.safetensors"))
            .unwrap()
            .len();
        let blocks = size / 4 / 1024;
        let mut line = format!("trap '' XFSZ; ulimit -f {blocks} && exec '{}'", BIN);
        for a in c.get_args() {
            line.push_str(&format!(" '{}'", a.to_string_lossy()));
        }
        Command::new("sh")
            .args(["-c", &line])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    });
    assert!(err.contains("File too large"), "{err}");
}

/// Whether `mount` works here (root with CAP_SYS_ADMIN); says so when it does not.
fn mount_tmpfs(at: &Path, bytes: u64) -> bool {
    fs::create_dir_all(at).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("note: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the full-disk test is skipped");
    }
    ok
}

#[test]
fn a_full_disk_stops_the_run_with_the_previous_checkpoint_intact() {
    let s = Setup::new();
    // The checkpoint's size, from a run on the ordinary disk.
    let probe = s.out("probe");
    succeeded(&s.train(&s.config(2, 2), &probe, &["--max-steps", "4"], &[]));
    let size = fs::metadata(probe.join("checkpoint.safetensors"))
        .unwrap()
        .len();
    let mnt = s.out("tmpfs");
    // Room for one checkpoint and the small files, not for a second checkpoint beside it.
    if !mount_tmpfs(&mnt, size + size / 2) {
        return;
    }
    let out = mnt.join("run");
    let result = std::panic::catch_unwind(|| {
        let err = second_checkpoint_fails(&s, &out, |mut c| c.output().unwrap());
        assert!(err.contains("No space left on device"), "{err}");
    });
    let _ = Command::new("umount").arg(&mnt).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn a_read_only_output_folder_stops_the_run_with_the_previous_checkpoint_intact() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let out = s.out("readonly");
    let cfg = s.config(2, 2);
    succeeded(&s.train(&cfg, &out, &["--max-steps", "4"], &[]));
    let before = fs::read(out.join("checkpoint.safetensors")).unwrap();
    let resume = s.command(&cfg, &out, &["--resume", out.to_str().unwrap()], &[]);
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let o = if root {
        // Root ignores permission bits: run as `nobody`, to whom the root-owned folder
        // (and its files) are read-only, and the pack and configuration readable.
        fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(resume.get_args())
            .env("RUST_BACKTRACE", "0")
            .output();
        match o {
            Ok(o) if !stderr(&o).contains("setpriv:") => o,
            _ => {
                eprintln!("note: running as root without a working setpriv; the read-only test is skipped (the size-limit and tmpfs tests cover failed writes)");
                return;
            }
        }
    } else {
        let mut resume = resume;
        fs::set_permissions(&out, fs::Permissions::from_mode(0o555)).unwrap();
        let o = resume.output().unwrap();
        fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
        o
    };
    let err = stderr(&o);
    // The first write fails (config.toml, metrics.jsonl or the checkpoint): it is named
    // with the OS error, and the checkpoint is untouched.
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains(&format!("error: {}/", out.display())) && err.contains("Permission denied"),
        "{err}"
    );
    assert_eq!(
        fs::read(out.join("checkpoint.safetensors")).unwrap(),
        before
    );
    let names = names_in(&out);
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
}

/// The `metrics.jsonl` step lines of `out`: step -> the `non_finite` field.
fn faults_logged(out: &Path) -> BTreeMap<u64, Option<String>> {
    fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| {
            (
                v["stats"]["step"].as_u64().unwrap(),
                v["non_finite"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn non_finite_steps_change_nothing_and_name_the_tensor() {
    let s = Setup::new();
    let cfg = s.config(2, 3);
    // Steps 5-7 faulted (two tensors at step 5: the first in the table's order is named),
    // then the run ends: its state must be the clean run's after step 4, bit for bit.
    let faulted = s.out("faulted");
    let o = s.train(
        &cfg,
        &faulted,
        &["--max-steps", "8"],
        &[(
            "PWSELF_TEST_NAN_STEPS",
            "5:blocks.1.mlp.fc1.weight,5:blocks.0.norm1.bias,6:loss,7",
        )],
    );
    succeeded(&o);
    let clean = s.out("clean");
    succeeded(&s.train(&cfg, &clean, &["--max-steps", "5"], &[]));
    assert_eq!(step_of(&faulted.join("checkpoint.safetensors")), 8);
    assert_eq!(step_of(&clean.join("checkpoint.safetensors")), 5);
    // Student, teacher (EMA), both moments, the centre and AdamW's step counts.
    assert_same_tensors(
        &clean.join("checkpoint.safetensors"),
        &faulted.join("checkpoint.safetensors"),
    );
    let err = stderr(&o);
    assert!(
        err.contains("step 5: non-finite gradient of blocks.0.norm1.bias")
            && err.contains("step 6: non-finite loss")
            && err.contains("step 7: non-finite gradient of ")
            && err.contains("nothing updated"),
        "{err}"
    );
    let logged = faults_logged(&faulted);
    assert_eq!(logged.len(), 8);
    assert_eq!(logged[&4], None);
    assert_eq!(
        logged[&5].as_deref(),
        Some("gradient of blocks.0.norm1.bias")
    );
    assert_eq!(logged[&6].as_deref(), Some("loss"));
    // A bare step faults the middle tensor of the table: a block's, not the first.
    let seventh = logged[&7].clone().unwrap();
    assert!(seventh.starts_with("gradient of blocks."), "{seventh}");
}

#[test]
fn ten_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint() {
    let s = Setup::new();
    let cfg = s.config(2, 5);
    let out = s.out("diverged");
    let steps: Vec<String> = (5..=14).map(|i| i.to_string()).collect();
    let o = s.train(
        &cfg,
        &out,
        &[],
        &[("PWSELF_TEST_NAN_STEPS", &steps.join(","))],
    );
    let err = stderr(&o);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("steps 5..=14 (10 in a row) had a non-finite loss or gradient")
            && err.contains("checkpoint-step00000004.safetensors (step 4), is intact")
            && err.contains("--lr")
            && err.contains("--resume"),
        "{err}"
    );
    // No checkpoint was written during the streak (epoch ends at steps 8 and 12).
    let names = names_in(&out);
    assert!(
        !names
            .iter()
            .any(|n| n.contains("step00000008") || n.contains("step00000012")),
        "{names:?}"
    );
    assert_eq!(step_of(&out.join("checkpoint.safetensors")), 4);
    let clean = s.out("clean");
    succeeded(&s.train(&cfg, &clean, &["--max-steps", "4"], &[]));
    assert_same_tensors(
        &clean.join("checkpoint.safetensors"),
        &out.join("checkpoint.safetensors"),
    );
    let logged = faults_logged(&out);
    assert_eq!(logged.len(), 15, "steps 0-14 logged");
    assert!((5..=14).all(|i| logged[&i].is_some()));
    // Nine in a row do not stop it.
    let nine: Vec<String> = (5..=13).map(|i| i.to_string()).collect();
    let o = s.train(
        &cfg,
        &s.out("nine"),
        &["--max-steps", "16"],
        &[("PWSELF_TEST_NAN_STEPS", &nine.join(","))],
    );
    succeeded(&o);
    assert_eq!(step_of(&s.out("nine").join("checkpoint.safetensors")), 16);
}

#[test]
fn damaged_foreign_and_future_checkpoints_are_refused_or_skipped() {
    let s = Setup::new();
    let cfg = s.config(2, 3);
    let run = s.out("run");
    succeeded(&s.train(&cfg, &run, &["--max-steps", "8"], &[]));
    let refused = |args: &[&str], config: &Path, must: &[&str]| {
        let o = s.train(config, &s.out("other"), args, &[]);
        let err = stderr(&o);
        assert!(!o.status.success() && !err.contains("panicked"), "{err}");
        for m in must {
            assert!(err.contains(m), "should mention {m:?}: {err}");
        }
    };
    // Truncated.
    let cut = s.out("cut.safetensors");
    let bytes = fs::read(run.join("checkpoint.safetensors")).unwrap();
    fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    refused(
        &["--resume", cut.to_str().unwrap()],
        &cfg,
        &["cut.safetensors", "truncated", "--resume"],
    );
    // Another architecture: depth 3.
    refused(
        &["--resume", run.to_str().unwrap()],
        &s.config(3, 3),
        &["checkpoint.safetensors", "another architecture", "blocks.2"],
    );
    // A future format version.
    let future = s.out("future.safetensors");
    let patched = {
        let mut b = bytes.clone();
        let needle = format!("\"format_version\":\"{}\"", checkpoint::VERSION);
        let at = b
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap();
        b[at + needle.len() - 2] = b'9';
        b
    };
    fs::write(&future, patched).unwrap();
    refused(
        &["--resume", future.to_str().unwrap()],
        &cfg,
        &["future.safetensors", "version 9", "upgrade"],
    );
    // The newest of a run directory damaged (one flipped bit in the step file, and so in
    // checkpoint.safetensors, its hard link): the previous one is used, with a warning.
    let newest = run.join(checkpoint::step_file_name(8));
    let mut b = fs::read(&newest).unwrap();
    let last = b.len() - 5;
    b[last] ^= 1;
    fs::write(&newest, &b).unwrap();
    let o = s.train(
        &cfg,
        &run,
        &["--resume", run.to_str().unwrap(), "--max-steps", "8"],
        &[],
    );
    succeeded(&o);
    let err = stderr(&o);
    assert!(
        err.contains("warning: skipping a damaged checkpoint")
            && err.contains("checkpoint.safetensors: checksum mismatch")
            && err.contains("resuming from")
            && err.contains("checkpoint-step00000004.safetensors at step 4"),
        "{err}"
    );
    // The replayed steps 4-7 rewrote step 8: the same as an uninterrupted run's.
    let clean = s.out("clean");
    succeeded(&s.train(&cfg, &clean, &["--max-steps", "8"], &[]));
    assert_same_tensors(
        &clean.join("checkpoint.safetensors"),
        &run.join("checkpoint.safetensors"),
    );
}
