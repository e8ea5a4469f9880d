#!/usr/bin/env python3
"""Writes the starting corpora of the fuzz targets into fuzz/corpus/<target>/ (gitignored):
small valid inputs built here, independently of the Rust writers, from the formats as
documented (src/data/pack.rs, src/data/idx.rs, src/data/cifar.rs, src/checkpoint.rs), plus the
repository's own TOML configurations. Each file starts with the target's mode byte(s)
(see the comment at the top of each fuzz_targets/*.rs). Usage: make_seeds.py [CORPUS_DIR]"""
import gzip
import json
import os
import struct
import sys
import zlib

here = os.path.dirname(os.path.abspath(__file__))
root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "corpus")


def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def crc(b):
    return zlib.crc32(b) & 0xFFFFFFFF


def pack(h, w, c, names, pixels, labels):
    """A version-1 pack: fixed header, mean/std, names, payload CRC, header CRC, padding."""
    body = struct.pack("<QIIII", len(labels), h, w, c, len(names))
    body += struct.pack("<%df" % c, *[0.5] * c) + struct.pack("<%df" % c, *[0.25] * c)
    for n in names:
        nb = n.encode()
        body += struct.pack("<H", len(nb)) + nb
    hlen = 16 + len(body) + 8
    payload = bytes(pixels) + struct.pack("<%dH" % len(labels), *labels)
    head = b"PWSPACK\0" + struct.pack("<II", 1, hlen) + body + struct.pack("<I", crc(payload))
    head += struct.pack("<I", crc(head))
    pad = (-hlen) % 64
    return head + b"\0" * pad + payload


grey = pack(2, 3, 1, ["a", "b"], range(12), [0, 1])
rgb = pack(2, 2, 3, ["cat", "dog", "ship"], range(24), [2, 0])
empty = pack(4, 4, 1, ["only"], [], [])
for i, p in enumerate([grey, rgb, empty]):
    for mode in (0, 1, 2):
        put("pack", "valid%d-mode%d" % (i, mode), bytes([mode]) + p)
    put("pack", "valid%d-gz" % i, bytes([3]) + gzip.compress(p, mtime=0))
    put("pack", "valid%d-gzfile" % i, bytes([2]) + gzip.compress(p, mtime=0))

# IDX: images 0x803 (count, rows, cols), labels 0x801 (count).
imgs = struct.pack(">IIII", 0x803, 2, 2, 3) + bytes(range(12))
labs = struct.pack(">II", 0x801, 2) + bytes([3, 9])
put("idx", "images", bytes([0, 0]) + imgs)
put("idx", "images-gz", bytes([0, 0]) + gzip.compress(imgs, mtime=0))
put("idx", "labels", bytes([1, 0]) + labs)
pair = imgs + labs
split = (len(imgs) * 255 + len(pair) - 1) // len(pair)
while split * len(pair) // 255 != len(imgs):
    split += 1 if split * len(pair) // 255 < len(imgs) else -1
put("idx", "pair", bytes([2, split]) + pair)
put("idx", "pair-named", bytes([3, split]) + pair)

# CIFAR: 10: label + 3072 pixels; 100: coarse + fine + 3072 pixels.
rec10 = bytes([7]) + bytes(i % 256 for i in range(3072))
rec100 = bytes([4, 77]) + bytes(i % 251 for i in range(3072))
put("cifar", "c10", bytes([0, 0]) + rec10)
put("cifar", "c10-two", bytes([4, 128]) + rec10 + rec10)
put("cifar", "c100-fine", bytes([1, 0]) + rec100)
put("cifar", "c100-coarse", bytes([2, 0]) + rec100)
names10 = "\n".join("n%d" % i for i in range(10)).encode()
put("cifar", "c10-names", bytes([8, 0]) + rec10 + b"\xff" + names10)

# Checkpoint for the target's table: cls_token (1,1,2), blocks.0.attn.qkv.weight (6,2),
# head.last_layer.weight_v (3,2) -> dino_head.*; center (1,2,3); weight_g (3,1).
shapes = {"cls_token": [1, 1, 2], "blocks.0.attn.qkv.weight": [6, 2], "dino_head.last_layer.weight_v": [3, 2]}
tensors = {}
for name, shape in shapes.items():
    student = name.replace("dino_head.", "head.")
    for full in (name, "student." + student, "optim.exp_avg." + student, "optim.exp_avg_sq." + student):
        tensors[full] = shape
tensors["dino_head.last_layer.weight_g"] = [3, 1]
tensors["loss.center"] = [1, 2, 3]
header, data = {}, b""
for i, (name, shape) in enumerate(sorted(tensors.items())):
    n = 1
    for s in shape:
        n *= s
    vals = struct.pack("<%df" % n, *[float(i + k) / 8 for k in range(n)])
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(vals)]}
    data += vals
meta = {"format": "pwself-engine-checkpoint", "format_version": "2", "step": "12", "epoch": "1",
        "adam_step": "12", "adam_step_last_layer": "11", "config": "{}"}
h = zlib.crc32(data)
for k in sorted(meta):
    h = zlib.crc32(k.encode() + b"\0" + meta[k].encode() + b"\0", h)
meta["checksum"] = "crc32:%08x" % (h & 0xFFFFFFFF)
header["__metadata__"] = meta
hj = json.dumps(header, separators=(",", ":")).encode()
hj += b" " * ((-len(hj)) % 8)
ckpt = struct.pack("<Q", len(hj)) + hj + data
put("checkpoint", "valid-mode0", bytes([0]) + ckpt)
put("checkpoint", "valid-mode1", bytes([1]) + ckpt)
put("checkpoint", "edits-none", bytes([2]))
put("checkpoint", "edits-resealed", bytes([6, 0, 100, 1]))
put("checkpoint", "roundtrip", bytes([3]) + bytes(range(256)) * 2)

# Configurations: the repository's own, and a few small ones.
repo = os.path.dirname(here)
for i, rel in enumerate(["runs/default/config.toml", "bench/fmnist_reference.toml"]):
    p = os.path.join(repo, rel)
    if os.path.exists(p):
        with open(p, "rb") as f:
            put("config", "repo%d" % i, bytes([27, 27, 1]) + f.read())
put("config", "empty", bytes([31, 31, 3]))
put("config", "pwll", bytes([223, 223, 3]) + b'[loss]\nkind = { pwll = { lambda = 0.3 } }\n[run]\nbatch = 8\n')
put("config", "views", bytes([27, 27, 1]) + b'[views]\nglobal_views = 2\nlocal_side = 12\nglobal_scale = [0.4, 1.0]\n[model]\npatch = 4\nheads = 2\n')

# Matching: arbitrary-driven; a few byte strings to start from.
put("matching", "zeros", bytes(64))
put("matching", "ramp", bytes(range(200)))
print("seeds written under", root)
