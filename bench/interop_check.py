"""timm side of scripts/interop.sh (docs/interop.md).

  images   --out DIR [--n 8] [--side 40]
      writes a few generated RGB PNGs as DIR/<class>/<i>.png for `pwself-engine prepare folder`.
  forward  --weights teacher.safetensors --probe-dir DIR
      builds timm's VisionTransformer from the file's metadata (and the registered model, when
      the metadata names one), loads the file with strict=True, runs forward_features on
      DIR/probe_input.npy and compares the CLS with the engine's DIR/probe_cls.npy.
  make-timm --like teacher.safetensors --probe-dir DIR --out timm.safetensors --cls-out timm_cls.npy
      a randomly initialised timm ViT of the same configuration: its state dict and its CLS of
      the probe input.
  compare  --engine a.npy --timm b.npy [--input-a x.npy --input-b y.npy]
      the max relative difference, max|a-b| / max|b|.

Each check prints one JSON line and exits 1 when the relative difference exceeds --tol (1e-4).
"""

import argparse
import json
import os
import struct
import sys
import zlib

import numpy as np


def png_bytes(rgb):
    """A minimal RGB PNG encoder (no PIL needed)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(tag, data):
        c = struct.pack(">I", len(data)) + tag + data
        return c + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def cmd_images(a):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : a.side, 0 : a.side] / a.side
    for i in range(a.n):
        cls = f"c{i % 2}"
        os.makedirs(os.path.join(a.out, cls), exist_ok=True)
        f = rng.uniform(1, 4, size=3)
        p = rng.uniform(0, 6.3, size=3)
        img = np.stack([np.sin(f[c] * 6.28 * (xx + yy * (c + 1) / 3) + p[c]) for c in range(3)], -1)
        img = (img * 100 + 128 + rng.normal(0, 12, img.shape)).clip(0, 255)
        with open(os.path.join(a.out, cls, f"{i:03d}.png"), "wb") as fh:
            fh.write(png_bytes(img))


def timm_kwargs(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "timm_kwargs" not in meta:
        sys.exit(f"{path}: no timm_kwargs metadata: export it with `pwself-engine export`")
    return json.loads(meta["timm_kwargs"]), meta


def build(kwargs):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**kwargs).eval()


def cls_of(model, x):
    import torch

    with torch.no_grad():
        return model.forward_features(torch.from_numpy(x))[:, 0].numpy()


def rel_diff(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def report(check, rel, tol, **extra):
    ok = rel <= tol
    print(json.dumps({"check": check, "max_rel_diff": rel, "tol": tol, "ok": ok, **extra}))
    return ok


def cmd_forward(a):
    import timm
    import torch
    from safetensors.torch import load_file

    kwargs, meta = timm_kwargs(a.weights)
    sd = load_file(a.weights)
    model = build(kwargs)
    model.load_state_dict(sd, strict=True)
    x = np.load(os.path.join(a.probe_dir, "probe_input.npy"))
    want = np.load(os.path.join(a.probe_dir, "probe_cls.npy"))
    got = cls_of(model, x)
    extra = {"kwargs": kwargs, "n": int(x.shape[0]), "torch": torch.__version__, "timm": timm.__version__}
    name = meta.get("timm_model", "custom")
    if name != "custom":
        over = {"num_classes": 0}
        if kwargs["img_size"] != 224:
            over["img_size"] = kwargs["img_size"]
        if kwargs["in_chans"] != 3:
            over["in_chans"] = kwargs["in_chans"]
        named = timm.create_model(name, **over).eval()
        named.load_state_dict(sd, strict=True)
        extra["named_model"] = name
        extra["named_max_rel_diff"] = rel_diff(cls_of(named, x), want)
    ok = report("engine export -> timm", rel_diff(got, want), a.tol, **extra)
    if "named_max_rel_diff" in extra:
        ok = ok and extra["named_max_rel_diff"] <= a.tol
    sys.exit(0 if ok else 1)


def cmd_make_timm(a):
    import torch
    from safetensors.torch import save_file

    kwargs, _ = timm_kwargs(a.like)
    torch.manual_seed(a.seed)
    model = build(kwargs)
    # timm starts some tensors at 0 or 1 (biases, norms); perturb them so that a tensor the
    # engine failed to load would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, a.out)
    x = np.load(os.path.join(a.probe_dir, "probe_input.npy"))
    np.save(a.cls_out, cls_of(model, x))
    print(json.dumps({"wrote": a.out, "tensors": len(sd), "cls": a.cls_out}))


def cmd_compare(a):
    ok = True
    if a.input_a and a.input_b:
        same = np.array_equal(np.load(a.input_a), np.load(a.input_b))
        if not same:
            print(json.dumps({"check": "probe inputs identical", "ok": False}))
            ok = False
    ok = report("timm -> engine --init", rel_diff(np.load(a.engine), np.load(a.timm)), a.tol) and ok
    sys.exit(0 if ok else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("images")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--side", type=int, default=40)
    p = sub.add_parser("forward")
    p.add_argument("--weights", required=True)
    p.add_argument("--probe-dir", required=True)
    p.add_argument("--tol", type=float, default=1e-4)
    p = sub.add_parser("make-timm")
    p.add_argument("--like", required=True)
    p.add_argument("--probe-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cls-out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("compare")
    p.add_argument("--engine", required=True)
    p.add_argument("--timm", required=True)
    p.add_argument("--input-a")
    p.add_argument("--input-b")
    p.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    {"images": cmd_images, "forward": cmd_forward, "make-timm": cmd_make_timm, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
