#!/usr/bin/env bash
# Reference run on the full Fashion-MNIST (60,000 train / 10,000 test): PW-Self (PWML,
# per-patch augmentation) against DINO (CLS loss, per-view augmentation) with the same
# budget, then the raw-pixel kNN baseline. Writes runs/fmnist-reference/{pwml,dino}/ and a
# markdown report under bench/results/. Budget: EPOCHS epochs each (default 3), about
# 35 minutes per run on the 2-core CPU machine.
#
#   bench/fmnist_reference.sh            # EPOCHS=3
#   EPOCHS=5 bench/fmnist_reference.sh
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${EPOCHS:-3}"
src=/usr/share/datasets/fashion-mnist
out=runs/fmnist-reference
mkdir -p "$out"

if [ ! -f "$src/train-images-idx3-ubyte.gz" ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
cargo build --release --bin pwself-engine
bin=target/release/pwself-engine
for split in train t10k; do
    [ -f "$out/$split.pwpack" ] || "$bin" prepare idx --classes fashion-mnist \
        --images "$src/$split-images-idx3-ubyte.gz" --labels "$src/$split-labels-idx1-ubyte.gz" \
        --out "$out/$split.pwpack"
done

common=(--data "$out/train.pwpack" --test-data "$out/t10k.pwpack" --config bench/fmnist_reference.toml
        --epochs "$epochs" --json)
cmd_pwml=("$bin" train "${common[@]}" --loss pwml --patch-aug on --out "$out/pwml")
cmd_dino=("$bin" train "${common[@]}" --loss dino --patch-aug off --out "$out/dino")
echo "${cmd_pwml[*]}" > "$out/commands.txt"
echo "${cmd_dino[*]}" >> "$out/commands.txt"
"${cmd_pwml[@]}" > "$out/pwml.json"
"${cmd_dino[@]}" > "$out/dino.json"

report="bench/results/$(date -u +%F)-fmnist-reference.md"
mkdir -p bench/results
cp "$out/pwml/curves.png" "bench/results/$(date -u +%F)-fmnist-reference-pwml.png"
cp "$out/dino/curves.png" "bench/results/$(date -u +%F)-fmnist-reference-dino.png"
python3 - "$out" "$report" "$epochs" <<'PY'
import json, sys, subprocess, platform
out, report, epochs = sys.argv[1], sys.argv[2], sys.argv[3]
runs = {name: json.load(open(f"{out}/{name}.json")) for name in ("pwml", "dino")}
def knn(res, k):
    return next(r["top1"] for r in res if r["k"] == k)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
lines = [
    "# Fashion-MNIST reference run: PW-Self (PWML) against DINO, same budget",
    "",
    f"- Date: see the file name. Commit: {commit}. Machine: {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores.",
    f"- Data: the full Fashion-MNIST from Debian's `dataset-fashion-mnist` (60,000 train, 10,000 test).",
    f"- Budget: {epochs} epochs each, configuration `bench/fmnist_reference.toml`; PW-Self = `--loss pwml --patch-aug on`, DINO = `--loss dino --patch-aug off`.",
    "- Commands: `bench/fmnist_reference.sh` ran:",
    "",
    "```",
    open(f"{out}/commands.txt").read().strip(),
    "```",
    "",
    "| method | kNN top-1 k=20 | kNN top-1 k=10 | at init k=20 | steps | minutes | img/s |",
    "|---|---|---|---|---|---|---|",
]
for name, label in (("pwml", "PW-Self (PWML, per-patch aug)"), ("dino", "DINO (CLS, per-view aug)")):
    r = runs[name]
    lines.append(f"| {label} | {knn(r['knn_trained'], 20):.2f} | {knn(r['knn_trained'], 10):.2f} | "
                 f"{knn(r['knn_init'], 20):.2f} | {r['steps']} | {r['seconds'] / 60:.1f} | {r['images_per_second']:.1f} |")
raw = runs["pwml"]["knn_raw_pixels"]
lines.append(f"| raw pixels (baseline) | {knn(raw, 20):.2f} | {knn(raw, 10):.2f} | | | | |")
lines += ["", "kNN per epoch (top-1, k=20):", "", "| epoch | PW-Self | DINO |", "|---|---|---|"]
ev = {n: {e["epoch"]: knn(e["knn"], 20) for e in runs[n]["evals"]} for n in runs}
for e in sorted(set(ev["pwml"]) | set(ev["dino"])):
    lines.append(f"| {e} | {ev['pwml'].get(e, float('nan')):.2f} | {ev['dino'].get(e, float('nan')):.2f} |")
lines += ["", "Curves: `*-fmnist-reference-pwml.png`, `*-fmnist-reference-dino.png` beside this file."]
open(report, "w").write("\n".join(lines) + "\n")
print(report)
PY
