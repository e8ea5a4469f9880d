#!/usr/bin/env python3
"""The PyTorch peer of pwself-engine's training step (issues 5 and 8).

One PW-Self training step written the way the PyTorch implementations do it: DINO's
main_dino.py and the PW-Self authors' code built on it (Local_Global_Representation_Learning).
It is meant to be timed side by side with the engine on the same machine, so it keeps
their structure, including the costs the engine avoids:

  * the backbone returns every token (CLS + patches, after the final norm) and the DINO
    head runs on EVERY token of every view (the engine runs it on matched tokens only);
  * the student runs one forward per resolution group (DINO's MultiCropWrapper);
  * patch matching (SPEC.md section 3) runs in Python/numpy on the host, every step,
    inside the timed region;
  * the teacher softmax and the centre cover every teacher token.

What is NOT in the timed step: the pixel pipeline. The views are random tensors made once
before timing; only their crop BOXES are real (torchvision RandomResizedCrop parameters,
SPEC.md section 1), because matching depends on them. The JSON says so ("views").

Two variants:
  eager    DINO's style: timm VisionTransformer with fused attention OFF (explicit
           softmax(QK^T)V, as DINO's vision_transformer.py), per-tensor clipping with a
           host sync per tensor (utils.clip_gradients), a Python loop for the EMA, the loss
           as a loop over teacher/student pairs. fp32 on CPU, bf16 autocast on CUDA.
  compile  the strongest PyTorch a user could write: timm with
           F.scaled_dot_product_attention, torch.compile of the backbones, heads and
           teacher-side softmax, the loss as one gather over all pairs, sync-free
           per-tensor clipping (foreach), fused AdamW where available, foreach EMA.

Nothing here is copied from DINO; comments name the DINO function a piece mirrors.
Only torch, timm, numpy and the standard library are used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.models.vision_transformer import VisionTransformer

# Named backbone sizes: (embed_dim, depth, heads). The same numbers as the engine's
# src/model/config.rs (Arch::dims); femto is the engine's default job (28x28, patch 4).
ARCHS = {
    "femto": (64, 4, 2),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="PyTorch peer of the pwself-engine training step (timing only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--variant", choices=["eager", "compile"], default="eager")
    p.add_argument("--arch", choices=list(ARCHS) + ["custom"], default="tiny",
                   help="backbone size; custom takes --embed-dim/--depth/--heads")
    p.add_argument("--embed-dim", type=int, default=None, help="custom (or override)")
    p.add_argument("--depth", type=int, default=None, help="custom (or override)")
    p.add_argument("--heads", type=int, default=None, help="custom (or override)")
    p.add_argument("--patch", type=int, default=None,
                   help="patch size; default 16, or 4 when --global-size <= 64")
    p.add_argument("--drop-path", type=float, default=0.1,
                   help="student stochastic depth (DINO's --drop_path_rate)")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--globals", type=int, default=2)
    p.add_argument("--locals", type=int, default=8)
    p.add_argument("--global-scale", type=float, nargs=2, default=(0.4, 1.0))
    p.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.4))
    p.add_argument("--source-size", type=int, default=None,
                   help="side of the (square) source image the boxes are drawn in; "
                        "default 256 (the official code squashes to 256x256), or "
                        "--global-size when that is <= 64 (28x28 / 32x32 datasets)")
    p.add_argument("--matching", choices=["batch", "per-image"], default="batch",
                   help="batch: one set of boxes per view index shared by the batch "
                        "(SPEC.md section 1, as the engine); per-image: boxes, matching "
                        "and loss gathers per image in a Python loop (the authors' loss)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out-dim", type=int, default=65536, help="K")
    p.add_argument("--head-layers", type=int, default=3)
    p.add_argument("--head-hidden", type=int, default=2048)
    p.add_argument("--head-bottleneck", type=int, default=256)
    p.add_argument("--loss", choices=["pwml", "dino"], default="pwml",
                   help="pwml: SPEC.md section 5 Eq 8 (head on every token); dino: DINO's "
                        "own step (CLS only through the head, no matching)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: fp32 on cpu, bf16 autocast on cuda")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero when the step fails (e.g. torch.compile cannot build)")
    a = p.parse_args(argv)

    dims = ARCHS.get(a.arch)
    if dims is None:
        if None in (a.embed_dim, a.depth, a.heads):
            p.error("--arch custom needs --embed-dim, --depth and --heads")
        dims = (a.embed_dim, a.depth, a.heads)
    a.embed_dim = a.embed_dim or dims[0]
    a.depth = a.depth or dims[1]
    a.heads = a.heads or dims[2]
    if a.embed_dim % a.heads:
        p.error(f"--embed-dim {a.embed_dim} is not divisible by --heads {a.heads}")
    if a.patch is None:
        a.patch = 4 if a.global_size <= 64 else 16
    for name, side in (("--global-size", a.global_size), ("--local-size", a.local_size)):
        if side % a.patch:
            p.error(f"{name} {side} is not a multiple of the patch size {a.patch}")
    if a.source_size is None:
        a.source_size = a.global_size if a.global_size <= 64 else 256
    if a.globals < 1:
        p.error("--globals must be at least 1: the teacher sees only globals")
    if a.precision == "auto":
        a.precision = "bf16" if a.device == "cuda" else "fp32"
    return a


# --------------------------------------------------------------------------------------
# Views: crop boxes (SPEC.md section 1). The pixels are random; the boxes are real.
# --------------------------------------------------------------------------------------


def random_resized_crop_box(rng, height, width, scale, flip_p=0.5):
    """torchvision's RandomResizedCrop.get_params (ratio 3/4..4/3, 10 tries, then the
    centre-crop fallback), then a horizontal flip. Returns (top, left, h, w, flipped)."""
    area = height * width
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    box = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))  # Python round: half to even
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:
        ratio = width / height
        if ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            h, w = height, width
        h, w = min(h, height), min(w, width)
        box = ((height - h) // 2, (width - w) // 2, h, w)
    return box + (bool(rng.random() < flip_p),)


def draw_boxes(rng, a, n_sets):
    """One crop record per view index (globals first), `n_sets` times (1 set per batch,
    or one per image)."""
    out = []
    for _ in range(n_sets):
        rec = [random_resized_crop_box(rng, a.source_size, a.source_size, a.global_scale)
               for _ in range(a.globals)]
        rec += [random_resized_crop_box(rng, a.source_size, a.source_size, a.local_scale)
                for _ in range(a.locals)]
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------
# Patch matching (SPEC.md section 3, the paper rule, exact integer arithmetic), on the
# host, per step, as the authors' code computes its correspondences in Python.
# --------------------------------------------------------------------------------------


def _axis_run(grid, crop_lo, extent, inter_lo, inter_hi, flipped):
    """Patch indices (in the view's own grid) of the rows/columns covered more than half
    by the intersection, listed in source order."""
    a = grid * (inter_lo - crop_lo)
    b = grid * (inter_hi - crop_lo)
    run = [c for c in range(grid)
           if 2 * (min(b, (c + 1) * extent) - max(a, c * extent)) > extent]
    return [grid - 1 - c for c in run] if flipped else run


def _subsample(n_big, n_small):
    if n_small == 0:
        return []
    if n_small == 1:
        return [0]
    return [k * (n_big - 1) // (n_small - 1) for k in range(n_small)]


def _pair_up(x, y):
    if len(x) >= len(y):
        return [x[i] for i in _subsample(len(x), len(y))], y
    return x, [y[i] for i in _subsample(len(y), len(x))]


def match_patches(r1, g1, r2, g2):
    """Token indices (idx1, idx2) of two views that see the same part of the source,
    CLS (0) first, then the matched grid row-major; patch token = 1 + row * P + col."""
    t1, l1, h1, w1, f1 = r1
    t2, l2, h2, w2, f2 = r2
    top, bottom = max(t1, t2), min(t1 + h1, t2 + h2)
    left, right = max(l1, l2), min(l1 + w1, l2 + w2)
    if top >= bottom or left >= right:
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    rows1, rows2 = _pair_up(_axis_run(g1, t1, h1, top, bottom, False),
                            _axis_run(g2, t2, h2, top, bottom, False))
    cols1, cols2 = _pair_up(_axis_run(g1, l1, w1, left, right, f1),
                            _axis_run(g2, l2, w2, left, right, f2))
    i1 = 1 + (np.asarray(rows1, np.int64)[:, None] * g1 + np.asarray(cols1, np.int64)[None, :])
    i2 = 1 + (np.asarray(rows2, np.int64)[:, None] * g2 + np.asarray(cols2, np.int64)[None, :])
    zero = np.zeros(1, np.int64)
    return np.concatenate([zero, i1.ravel()]), np.concatenate([zero, i2.ravel()])


def all_pairs(records, a):
    """For each teacher view i (a global) and each student view j != i: (i, j, idx_t, idx_s).
    2 globals + 8 locals give 2 + 16 = 18 pairs."""
    grids = [a.global_size // a.patch] * a.globals + [a.local_size // a.patch] * a.locals
    out = []
    for i in range(a.globals):
        for j in range(len(records)):
            if j != i:
                it, js = match_patches(records[i], grids[i], records[j], grids[j])
                out.append((i, j, it, js))
    return out


# --------------------------------------------------------------------------------------
# Network: timm ViT returning all tokens + DINO head
# --------------------------------------------------------------------------------------


def make_backbone(a, drop_path, fused_attn):
    """timm VisionTransformer, pre-norm, qkv bias, LN eps 1e-6, position embeddings
    resampled (bicubic) for the local resolution, no classifier: forward_features gives
    every token after the final norm, as DINO's get_intermediate/forward with all tokens."""
    m = VisionTransformer(
        img_size=a.global_size, patch_size=a.patch, in_chans=a.in_chans, num_classes=0,
        global_pool="", embed_dim=a.embed_dim, depth=a.depth, num_heads=a.heads,
        mlp_ratio=4.0, qkv_bias=True, drop_path_rate=drop_path, dynamic_img_size=True,
    )
    n_attn = 0
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            # False: q @ k^T, softmax, @ v written out (DINO's Attention.forward);
            # True: F.scaled_dot_product_attention.
            mod.fused_attn = fused_attn
            n_attn += 1
    if n_attn != a.depth:
        raise RuntimeError(f"found {n_attn} timm attention modules with fused_attn, expected "
                           f"{a.depth}: this timm version's Attention changed")
    return m


class DINOHead(nn.Module):
    """DINO's DINOHead: MLP (layers Linear, GELU between), L2 normalisation, then a
    weight-normalised Linear(bottleneck, K, bias=False) whose gain g is fixed to 1
    (norm_last_layer=True), i.e. each output row of the weight is unit-normalised.
    The weight_norm(g=1) forward is written out: W = v / ||v||_row."""

    def __init__(self, in_dim, out_dim, layers, hidden, bottleneck):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mods = []
        for k in range(layers):
            mods.append(nn.Linear(dims[k], dims[k + 1]))
            if k < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.last_layer_v = nn.Parameter(torch.empty(out_dim, bottleneck))
        for mod in self.mlp:
            if isinstance(mod, nn.Linear):  # DINOHead._init_weights
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
        nn.init.trunc_normal_(self.last_layer_v, std=0.02)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        w = F.normalize(self.last_layer_v, dim=1, p=2)
        return F.linear(x, w)


class Net(nn.Module):
    """Backbone + head (DINO's MultiCropWrapper holds the same two)."""

    def __init__(self, a, drop_path, fused_attn):
        super().__init__()
        self.backbone = make_backbone(a, drop_path, fused_attn)
        self.head = DINOHead(a.embed_dim, a.out_dim, a.head_layers, a.head_hidden,
                             a.head_bottleneck)


def param_groups(model):
    """DINO's utils.get_params_groups: no weight decay on biases and 1-d tensors."""
    reg, noreg = [], []
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        (noreg if name.endswith(".bias") or prm.ndim == 1 else reg).append(prm)
    return [{"params": reg}, {"params": noreg, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------
# Clipping, last-layer freeze, EMA
# --------------------------------------------------------------------------------------


def clip_gradients_per_tensor(model, clip):
    """Mirrors DINO's utils.clip_gradients: each parameter's gradient norm is clipped to
    `clip` on its own (coef = clip / (norm + 1e-6), applied when < 1). The Python `if`
    on a device tensor is a host sync per tensor, as in DINO."""
    for prm in model.parameters():
        if prm.grad is not None:
            coef = clip / (prm.grad.data.norm(2) + 1e-6)
            if coef < 1:
                prm.grad.data.mul_(coef)


def clip_gradients_per_tensor_foreach(grads, clip):
    """The same per-tensor rule without host syncs: foreach norms, coef clamped at 1."""
    coefs = torch._foreach_add(torch._foreach_norm(grads, 2), 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Mirrors DINO's utils.cancel_gradients_last_layer: drop the last head layer's
    gradient during the first `freeze_last_layer` epochs. The timed steps are taken as
    epoch 1 (>= freeze_last_layer = 1), so nothing is dropped, but the check runs."""
    if epoch >= freeze_last_layer:
        return
    for name, prm in model.named_parameters():
        if "last_layer" in name:
            prm.grad = None


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


class Peer:
    def __init__(self, a, dev):
        self.a = a
        self.dev = dev
        compiled = a.variant == "compile"
        torch.manual_seed(a.seed)
        # Student with drop path, teacher without; same initial weights (DINO loads the
        # student's state dict into the teacher).
        self.student = Net(a, a.drop_path, fused_attn=compiled).to(dev)
        self.teacher = Net(a, 0.0, fused_attn=compiled).to(dev)
        self.teacher.load_state_dict(self.student.state_dict())
        for prm in self.teacher.parameters():
            prm.requires_grad_(False)
        self.student.train()
        self.teacher.train()  # DINO keeps the teacher in train mode; no dropout/BN here.

        self.s_params = list(self.student.parameters())
        self.t_params = list(self.teacher.parameters())
        lr = 5e-4 * a.batch / 256  # DINO's linear scaling rule, schedules frozen for timing
        opt_kw = {}
        if compiled:
            opt_kw = {"fused": True}
        try:
            self.opt = torch.optim.AdamW(param_groups(self.student), lr=lr, weight_decay=0.04,
                                         **opt_kw)
        except (RuntimeError, TypeError):  # no fused AdamW for this device/build
            self.opt = torch.optim.AdamW(param_groups(self.student), lr=lr, weight_decay=0.04,
                                         foreach=True)
            opt_kw = {"foreach": True}
        self.adamw_kind = "fused" if opt_kw.get("fused") else (
            "foreach" if opt_kw.get("foreach") else "default")

        self.momentum = 0.996
        self.center_momentum = 0.9
        self.student_temp = 0.1
        self.teacher_temp = 0.04  # DINO's default (warm-up frozen for timing)
        self.clip = 3.0
        self.epoch = 1  # past freeze_last_layer = 1
        self.freeze_last_layer = 1
        n_global_tokens = 1 + (a.global_size // a.patch) ** 2
        # SPEC.md section 5: one centre per teacher token position (official code); DINO's
        # own loss has a single (1, K) centre for the CLS.
        c_rows = 1 if a.loss == "dino" else n_global_tokens
        self.center = torch.zeros(c_rows, a.out_dim, device=dev)

        self.autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
                         if a.precision == "bf16" else None)

        # The pieces that torch.compile takes in the compile variant.
        self.s_backbone = self.student.backbone.forward_features
        self.t_backbone = self.teacher.backbone.forward_features
        self.s_head = self.student.head
        self.t_head = self.teacher.head
        self.t_probs = self._teacher_probs
        if compiled:
            # dynamic=False: the student backbone sees two resolutions; each gets its own
            # static-shape graph instead of one dynamic-shape graph after a recompile.
            self.s_backbone = torch.compile(self.s_backbone, dynamic=False)
            self.t_backbone = torch.compile(self.t_backbone, dynamic=False)
            self.s_head = torch.compile(self.s_head, dynamic=False)
            self.t_head = torch.compile(self.t_head, dynamic=False)
            self.t_probs = torch.compile(self._teacher_probs, dynamic=False)

    # ---- teacher side -------------------------------------------------------------

    def _teacher_probs(self, t_logits, center, temp: float):
        """DINOLoss.forward's centring and sharpening, then DINOLoss.update_center's
        batch mean (over images and globals: dim 0), computed together."""
        t = t_logits.float()
        probs = F.softmax((t - center) / temp, dim=-1)
        batch_center = t.mean(dim=0)
        return probs, batch_center

    # ---- forward ----------------------------------------------------------------

    def forward(self, g_views, l_views):
        """g_views: (globals*B, C, G, G), l_views: (locals*B, C, L, L), view-major (DINO's
        concatenation order). Returns teacher probs (globals, B, Nt, K), the centre's batch
        mean, and the student logits per resolution group: [(globals, B, Ng, K),
        (locals, B, Nl, K)] (Nt = Ng = all tokens; 1 for the DINO loss)."""
        a = self.a
        B = a.batch
        cls_only = a.loss == "dino"
        with torch.no_grad():
            t_tok = self.t_backbone(g_views)  # (gB, Ng, D), all tokens after the final norm
            if cls_only:
                t_tok = t_tok[:, :1]
            t_out = self.t_head(t_tok)  # the head on every token
            t_out = t_out.reshape(a.globals, B, t_tok.shape[1], a.out_dim)
            probs, batch_center = self.t_probs(t_out.flatten(0, 1), self.center,
                                               self.teacher_temp)
            probs = probs.reshape(t_out.shape)
        # Student: DINO's MultiCropWrapper, one backbone forward per resolution group
        # (views of equal size concatenated), then ONE head call on everything.
        groups = [g_views] + ([l_views] if l_views is not None else [])
        counts = [a.globals] + ([a.locals] if l_views is not None else [])
        toks = []
        for x in groups:
            tk = self.s_backbone(x)
            toks.append(tk[:, :1] if cls_only else tk)
        shapes = [tk.shape[:2] for tk in toks]
        flat = torch.cat([tk.reshape(-1, tk.shape[-1]) for tk in toks])
        s_flat = self.s_head(flat)
        s_out, at = [], 0
        for (rows, n), v in zip(shapes, counts):
            s_out.append(s_flat[at:at + rows * n].reshape(v, B, n, a.out_dim))
            at += rows * n
        return probs, batch_center, s_out

    def student_view(self, s_out, j):
        return s_out[0][j] if j < self.a.globals else s_out[1][j - self.a.globals]

    # ---- losses -----------------------------------------------------------------

    def loss_dino(self, probs, s_out):
        """DINOLoss.forward: every (teacher global, other view) pair, H(p_t, q_s) on the
        CLS token, mean over images, mean over pairs."""
        total, n = 0.0, 0
        nv = self.a.globals + self.a.locals
        for i in range(self.a.globals):
            for j in range(nv):
                if j == i:
                    continue
                s = self.student_view(s_out, j)[:, 0].float() / self.student_temp
                t = probs[i][:, 0]
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                n += 1
        return total / n

    def loss_pwml_pairs(self, probs, s_out, pairs):
        """PWML (SPEC.md section 5, Eq 8) as the authors' loss loop computes it: for each
        pair, gather the matched teacher and student tokens, H per matched token, mean over
        the M matched tokens (CLS included), then the mean over images and pairs.
        Batch-shared boxes: one gather per pair for the whole batch."""
        total = 0.0
        for i, j, it, js in pairs:
            it_t = torch.from_numpy(it).to(self.dev, non_blocking=True)
            js_t = torch.from_numpy(js).to(self.dev, non_blocking=True)
            t = probs[i][:, it_t]  # (B, M, K)
            s = self.student_view(s_out, j)[:, js_t].float() / self.student_temp
            h = torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1)  # (B, M)
            total = total + h.mean(dim=1).mean()
        return total / len(pairs)

    def loss_pwml_per_image(self, probs, s_out, pairs_per_image):
        """The authors' loop literally: for each pair and each image, that image's own
        correspondences, gather, H, mean over its M tokens; mean over images and pairs."""
        total, n = 0.0, 0
        for b, pairs in enumerate(pairs_per_image):
            for i, j, it, js in pairs:
                it_t = torch.from_numpy(it).to(self.dev, non_blocking=True)
                js_t = torch.from_numpy(js).to(self.dev, non_blocking=True)
                t = probs[i][b, it_t]
                s = self.student_view(s_out, j)[b, js_t].float() / self.student_temp
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                n += 1
        return total / n

    def loss_pwml_gathered(self, probs, s_out, pairs):
        """The same PWML value as loss_pwml_pairs, vectorised (compile variant): one
        gather per resolution group over all pairs, one log-softmax, weights 1/(M * pairs)."""
        a = self.a
        rows = {0: ([], [], [], []), 1: ([], [], [], [])}  # group -> t_view, t_tok, s_view, s_tok
        wts = {0: [], 1: []}
        for i, j, it, js in pairs:
            g, sv = (0, j) if j < a.globals else (1, j - a.globals)
            tv, tt, svs, sts = rows[g]
            m = len(it)
            tv.append(np.full(m, i, np.int64))
            tt.append(it)
            svs.append(np.full(m, sv, np.int64))
            sts.append(js)
            wts[g].append(np.full(m, 1.0 / (m * len(pairs)), np.float32))
        total = 0.0
        for g in (0, 1):
            if not wts[g]:
                continue
            idx = [torch.from_numpy(np.concatenate(r)).to(self.dev, non_blocking=True)
                   for r in rows[g]]
            w = torch.from_numpy(np.concatenate(wts[g])).to(self.dev, non_blocking=True)
            t = probs[idx[0], :, idx[1]]  # (L, B, K)
            s = s_out[g][idx[2], :, idx[3]].float() / self.student_temp
            h = torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1)  # (L, B)
            total = total + (h.mean(dim=1) * w).sum()
        return total

    # ---- one step ---------------------------------------------------------------

    def step(self, g_views, l_views, records):
        """One training step. `records`: crop records (one set per batch, or one per
        image). Returns (loss tensor, matched token pairs per image)."""
        a = self.a
        compiled = a.variant == "compile"
        # Matching on the host (the authors call augment.correspondences per image and pair).
        matched = None  # DINO's loss matches nothing
        pairs = per_image = None
        tm = time.perf_counter()
        if a.loss == "pwml":
            if a.matching == "batch":
                pairs = all_pairs(records[0], a)
                matched = sum(len(p[2]) for p in pairs)
            else:
                per_image = [all_pairs(r, a) for r in records]
                matched = sum(len(p[2]) for pi in per_image for p in pi) / len(per_image)
        self.last_match_ms = (time.perf_counter() - tm) * 1e3

        ctx = self.autocast if self.autocast is not None else _Null()
        with ctx:
            probs, batch_center, s_out = self.forward(g_views, l_views)
            if a.loss == "dino":
                loss = self.loss_dino(probs, s_out)
            elif per_image is not None:
                loss = self.loss_pwml_per_image(probs, s_out, per_image)
            elif compiled:
                loss = self.loss_pwml_gathered(probs, s_out, pairs)
            else:
                loss = self.loss_pwml_pairs(probs, s_out, pairs)

        # DINOLoss.update_center (all teacher tokens; per token position for PWML).
        with torch.no_grad():
            self.center.mul_(self.center_momentum).add_(
                batch_center, alpha=1 - self.center_momentum)

        # train_one_epoch: zero_grad, backward, clip, cancel last layer, step.
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if compiled:
            grads = [p.grad for p in self.s_params if p.grad is not None]
            clip_gradients_per_tensor_foreach(grads, self.clip)
        else:
            clip_gradients_per_tensor(self.student, self.clip)
        cancel_gradients_last_layer(self.epoch, self.student, self.freeze_last_layer)
        self.opt.step()

        # EMA of the teacher over all parameters, the head included.
        with torch.no_grad():
            m = self.momentum
            if compiled:
                torch._foreach_mul_(self.t_params, m)
                torch._foreach_add_(self.t_params, self.s_params, alpha=1 - m)
            else:
                for ps, pt in zip(self.s_params, self.t_params):  # train_one_epoch's loop
                    pt.data.mul_(m).add_((1 - m) * ps.detach().data)
        return loss, matched


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def peak_memory(dev):
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev)), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return int(rss * scale), "ru_maxrss (whole process, bytes)"


def run(a):
    if a.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch.cuda.is_available() is False")
    if a.threads and a.device == "cpu":
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # main_dino.py sets it
        if a.variant == "compile":
            # TF32 for whatever fp32 matmuls remain outside autocast (DINO leaves the
            # PyTorch default, no TF32 for matmuls).
            torch.set_float32_matmul_precision("high")

    peer = Peer(a, dev)
    rng = np.random.default_rng(a.seed)
    gen = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    # Random views, made once (the pixel pipeline is outside the timed step).
    B = a.batch
    g_views = torch.randn(a.globals * B, a.in_chans, a.global_size, a.global_size,
                          generator=gen).to(dev)
    l_views = (torch.randn(a.locals * B, a.in_chans, a.local_size, a.local_size,
                           generator=gen).to(dev) if a.locals else None)

    n_sets = 1 if a.matching == "batch" else B
    times, cpu_times, match_times, losses, matched = [], [], [], [], []
    for k in range(a.warmup + a.steps):
        records = draw_boxes(rng, a, n_sets)  # the data loader's work: not timed
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss, m = peer.step(g_views, l_views, records)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) * 1e3
        dc = (time.process_time() - c0) * 1e3  # CPU time of all threads of this process
        lv = float(loss.detach())  # main_dino reads the loss every step (isfinite check)
        if not math.isfinite(lv):
            raise RuntimeError(f"loss is {lv} at step {k}")
        if k >= a.warmup:
            times.append(dt)
            cpu_times.append(dc)
            match_times.append(peer.last_match_ms)
            losses.append(lv)
            matched.append(m)
        if not a.json:
            tag = "warm-up" if k < a.warmup else "timed"
            print(f"step {k:3d} ({tag}): {dt:9.1f} ms  loss {lv:.4f}  matched pairs {m}",
                  flush=True)
    med = statistics.median(times)
    peak, peak_how = peak_memory(dev)
    return {
        "step_ms": [round(t, 3) for t in times],
        "median_ms": round(med, 3),
        # CPU time the process got per step (all threads). On a CPU run with N threads and
        # an otherwise idle machine it is about N x step_ms; much less means the step was
        # starved by other load and its wall time is inflated.
        "step_cpu_ms": [round(t, 3) for t in cpu_times],
        "img_per_s": round(B / (med / 1e3), 3),
        "match_ms": [round(t, 3) for t in match_times],  # host matching, inside step_ms
        "peak_memory_bytes": peak,
        "peak_memory_measure": peak_how,
        "matched_pairs_per_step": matched,
        "loss": [round(v, 5) for v in losses],
        "adamw": peer.adamw_kind,
        "device_name": device_name(dev),
    }


def main(argv=None):
    a = parse_args(argv)
    nt = 1 + (a.global_size // a.patch) ** 2
    nl = 1 + (a.local_size // a.patch) ** 2
    report = {
        "peer": "bench/torch_peer.py",
        "config": {k.replace("_", "-"): (list(v) if isinstance(v, tuple) else v)
                   for k, v in sorted(vars(a).items()) if k not in ("json", "strict")},
        "tokens_per_view": {"global": nt, "local": nl},
        "views": "random tensors, boxes from RandomResizedCrop",
        "timed": "host matching + teacher/student forward + head on every token + loss "
                 "+ centre + backward + per-tensor clip + AdamW + EMA",
        "epoch": "timed steps are epoch >= freeze_last_layer (1): last layer not frozen",
        "attention": "F.scaled_dot_product_attention" if a.variant == "compile"
                     else "explicit softmax(QK^T)V (timm fused_attn off)",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    rc = 0
    try:
        report.update(run(a))
    except Exception as e:  # e.g. inductor cannot build on this machine
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc(limit=8)
        rc = 1 if a.strict else 0
        if not a.json:
            print(report["traceback"], file=sys.stderr)
    if a.json:
        print(json.dumps(report))
    elif "error" not in report:
        print(f"{a.variant} {a.device}: median {report['median_ms']:.1f} ms/step, "
              f"{report['img_per_s']:.1f} img/s, peak {report['peak_memory_bytes'] / 2**20:.0f} "
              f"MiB, matched pairs/step {report['matched_pairs_per_step']}")
    else:
        print(f"error: {report['error']}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
