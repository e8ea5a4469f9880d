#!/usr/bin/env python3
"""The engine's CPU training step beside the PyTorch peer's, timed alternately (issue 8).

For each configuration it runs `--rounds` rounds; a round is one engine block (a fresh
process of `benches/train_step.rs --step-timer`: warm-up steps, then timed steps) followed
by one block of each PyTorch variant (a fresh process of `scripts/torch-peer.sh --json`,
the same warm-up and timed counts). Alternating blocks spreads the machine's background
load over both sides. Both sides: fp32, the same shapes, the same thread count.

Reported per configuration: every step time, the median over all timed steps of each side,
the per-round ratio engine/PyTorch (round medians), the process CPU time per step (about
threads x wall on an idle machine; much less means other load starved the step), and the
peak resident memory of each block's whole process from `/usr/bin/time -f %M` (the same
measure for both sides; each side's own number, VmHWM or ru_maxrss, is kept too).

What a timed step includes:
  engine   teacher + student forwards, head on all teacher tokens and the matched student
           tokens, PWML, backward, per-tensor clipping, AdamW, EMA, centre. Views and
           matching are built before the loop (the trainer's loader thread builds them
           ahead of the step), so neither is timed.
  PyTorch  host patch matching (numpy, inside the step, reported as match_ms), teacher +
           student forwards, head on every token, PWML, centre, backward, per-tensor
           clipping, AdamW, EMA. Views are random tensors made once (not timed).

Configurations (both sides are given the same numbers; the script prints both sides'
configurations so they can be compared):
  small28  the default job: femto ViT (64 dims, 4 blocks, 2 heads), patch 4, 1 channel,
           2 x 28 + 6 x 12 views, head 3 layers 256/64, K = 512, PWML, batch 64.
  tiny224  ViT-Tiny/16 (192, 12, 3), 3 channels, the paper224 preset (2 x 224 + 8 x 96),
           DINO's head (2048/2048/256, K = 65536), PWML, batch 8.

Usage (from the repo root; builds the bench binary with cargo unless --engine-bin):
  python3 bench/cpu_side_by_side.py --threads 2 --rounds 3 \
      --config small28:eager,compile:2:5 --config tiny224:eager:1:2 --out results.json
A config is NAME:VARIANTS:WARMUP:STEPS (PyTorch variants comma-separated).
`--engine-bin-base PATH` adds a second engine block per round (e.g. the binary before a
change) so before and after are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCH_ARGS = {
    "small28": ["--arch", "femto", "--patch", "4", "--global-size", "28", "--local-size", "12",
                "--globals", "2", "--locals", "6", "--in-chans", "1", "--batch", "64",
                "--out-dim", "512", "--head-layers", "3", "--head-hidden", "256",
                "--head-bottleneck", "64", "--loss", "pwml", "--drop-path", "0.1"],
    "tiny224": ["--arch", "tiny", "--patch", "16", "--global-size", "224", "--local-size", "96",
                "--globals", "2", "--locals", "8", "--in-chans", "3", "--batch", "8",
                "--out-dim", "65536", "--head-layers", "3", "--head-hidden", "2048",
                "--head-bottleneck", "256", "--loss", "pwml", "--drop-path", "0.1"],
}


def engine_binary() -> str:
    """Builds benches/train_step.rs (release) and returns the executable's path."""
    out = subprocess.run(
        ["cargo", "bench", "--bench", "train_step", "--no-run", "--message-format=json"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    for line in out.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
                msg.get("target", {}).get("name") == "train_step":
            return msg["executable"]
    sys.exit("cpu_side_by_side: cargo built no train_step bench executable")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_block(cmd: list[str], env: dict | None = None) -> dict:
    """Runs one block under /usr/bin/time; returns its JSON plus max RSS and timing."""
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf:
        tpath = tf.name
    la0, t0 = loadavg(), time.time()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tpath] + cmd, cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, **(env or {})})
    wall = time.time() - t0
    with open(tpath) as f:
        lines = [ln for ln in f.read().split() if ln.strip()]
    os.unlink(tpath)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise RuntimeError(f"block failed (exit {p.returncode}): {' '.join(cmd)}")
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    if "error" in rep:
        raise RuntimeError(f"block reported an error: {rep['error']}")
    rep["time_maxrss_bytes"] = int(lines[-1]) * 1024 if lines else None
    rep["loadavg_before"] = la0
    rep["loadavg_after"] = loadavg()
    rep["process_wall_s"] = round(wall, 1)
    return rep


def parse_config(spec: str):
    parts = spec.split(":")
    name = parts[0]
    if name not in TORCH_ARGS:
        raise SystemExit(f"--config {spec}: unknown name {name} (small28, tiny224)")
    variants = parts[1].split(",") if len(parts) > 1 and parts[1] else ["eager"]
    warmup = int(parts[2]) if len(parts) > 2 else 2
    steps = int(parts[3]) if len(parts) > 3 else 5
    return name, variants, warmup, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None,
                    help="NAME:VARIANTS:WARMUP:STEPS (default small28:eager:2:5 and "
                         "tiny224:eager:1:2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-bin", default=None, help="train_step bench executable")
    ap.add_argument("--engine-bin-base", default=None,
                    help="a second engine executable (e.g. before a change), run each round")
    ap.add_argument("--out", default=None, help="write every block's JSON here")
    a = ap.parse_args()
    configs = [parse_config(c) for c in (a.config or ["small28:eager:2:5", "tiny224:eager:1:2"])]
    engines = {"engine": a.engine_bin or engine_binary()}
    if a.engine_bin_base:
        engines = {"engine-base": a.engine_bin_base, **engines}
    # Same thread count everywhere: rayon + matrixmultiply (the bench sets both from
    # --threads), torch.set_num_threads (--threads); OpenMP/MKL told the same.
    env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}

    everything = {"threads": a.threads, "rounds": a.rounds, "started": time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "engines": engines, "configs": {}}
    for name, variants, warmup, steps in configs:
        blocks = []
        print(f"== {name}: {a.rounds} rounds of engine then PyTorch {variants}, "
              f"{warmup} warm-up + {steps} timed steps per block, {a.threads} threads",
              file=sys.stderr, flush=True)
        for r in range(a.rounds):
            order = [(k, None) for k in engines] + [("torch", v) for v in variants]
            for side, variant in order:
                if side == "torch":
                    cmd = (["scripts/torch-peer.sh", "--device", "cpu", "--variant", variant,
                            "--precision", "fp32", "--threads", str(a.threads),
                            "--warmup", str(warmup), "--steps", str(steps), "--json"]
                           + TORCH_ARGS[name])
                    label = f"torch-{variant}"
                else:
                    cmd = [engines[side], "--step-timer", "--config", name,
                           "--threads", str(a.threads), "--warmup", str(warmup),
                           "--steps", str(steps)]
                    label = side
                rep = run_block(cmd, env)
                rep["side"], rep["round"] = label, r
                blocks.append(rep)
                print(f"   round {r} {label:14s} median {rep['median_ms']:10.1f} ms  steps "
                      f"{rep['step_ms']}  cpu {rep['step_cpu_ms']}  maxrss "
                      f"{rep['time_maxrss_bytes'] / 2**30:.2f} GiB  load {rep['loadavg_before']}"
                      f" -> {rep['loadavg_after']}", file=sys.stderr, flush=True)
                if a.out:
                    everything["configs"][name] = blocks
                    with open(a.out, "w") as f:
                        json.dump(everything, f, indent=1)
        everything["configs"][name] = blocks
        summarize(name, blocks, a.rounds)
    everything["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if a.out:
        with open(a.out, "w") as f:
            json.dump(everything, f, indent=1)


def summarize(name: str, blocks: list[dict], rounds: int):
    sides = []
    for b in blocks:
        if b["side"] not in sides:
            sides.append(b["side"])
    print(f"\n### {name}\n")
    # Configurations, as each side reports them.
    for s in sides:
        b = next(x for x in blocks if x["side"] == s)
        print(f"- {s} config: {json.dumps(b['config'], sort_keys=True)}")
    print()
    print("| side | median ms/step (all timed steps) | round medians (ms) | CPU ms/step "
          "(median) | peak RSS GiB (/usr/bin/time, max over blocks) | own peak measure GiB |")
    print("|---|---:|---|---:|---:|---:|")
    med = {}
    for s in sides:
        bs = [x for x in blocks if x["side"] == s]
        steps = [t for x in bs for t in x["step_ms"]]
        cpu = [t for x in bs for t in x["step_cpu_ms"]]
        med[s] = statistics.median(steps)
        rss = max(x["time_maxrss_bytes"] for x in bs) / 2**30
        own = max(x["peak_memory_bytes"] for x in bs) / 2**30
        rm = ", ".join(f"{x['median_ms']:.0f}" for x in bs)
        print(f"| {s} | {med[s]:.1f} | {rm} | {statistics.median(cpu):.0f} | {rss:.2f} | "
              f"{own:.2f} |")
    print()
    engines = [s for s in sides if s.startswith("engine")]
    torches = [s for s in sides if s.startswith("torch")]
    print("| ratio | per round (round medians) | median of rounds | all-step medians |")
    print("|---|---|---:|---:|")
    for e in engines:
        for t in torches:
            per = []
            for r in range(rounds):
                be = [x for x in blocks if x["side"] == e and x["round"] == r]
                bt = [x for x in blocks if x["side"] == t and x["round"] == r]
                if be and bt:
                    per.append(be[0]["median_ms"] / bt[0]["median_ms"])
            print(f"| {e} / {t} | {', '.join(f'{p:.3f}' for p in per)} | "
                  f"{statistics.median(per):.3f} | {med[e] / med[t]:.3f} |")
    if len(engines) == 2:
        per = []
        for r in range(rounds):
            b0 = [x for x in blocks if x["side"] == engines[0] and x["round"] == r]
            b1 = [x for x in blocks if x["side"] == engines[1] and x["round"] == r]
            if b0 and b1:
                per.append(b1[0]["median_ms"] / b0[0]["median_ms"])
        print(f"| {engines[1]} / {engines[0]} | {', '.join(f'{p:.3f}' for p in per)} | "
              f"{statistics.median(per):.3f} | {med[engines[1]] / med[engines[0]]:.3f} |")
    tb = [x for x in blocks if x["side"].startswith("torch")]
    if tb:
        mm = statistics.median([m for x in tb for m in x.get("match_ms", [])] or [0])
        print(f"\nPyTorch host matching inside its step: median {mm:.1f} ms/step.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
