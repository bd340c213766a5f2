"""Patch-level mammography training: self-supervised pretraining, patch classifiers, woman-grouped folds.

Works on :class:`~napari_medssl.mammo.PatchSampler` batches (full-resolution breast patches) instead of the
engine's whole-image samples; ``scripts/mammo_cv.py`` drives it for the cross-validated comparison and the
zoo models. Every run is a fixed number of steps (AdamW, linear warm-up, cosine decay): nothing is selected
on a held-out fold.

- :data:`METHODS`: the four compared ViT models (same encoder width/depth/token count, 128² patches at 200 µm):
  MIRAM (encoder on the 64² low-resolution view, patch 4; Nyström decoder reconstructing the 128² patch as
  32 × 32 = 1024 tokens), MAE and MSMAE (patch 8 on the 128² patch), a from-scratch ViT; and a small
  convolutional baseline (``cnn``: ``cnn_tiny``, a reduced-width ResNet, supervised only).
- :func:`pretrain` / :func:`finetune`: the loops; :func:`classifier_from` builds the classifier of a method,
  initialised from its pretrained weights.
- :func:`woman_folds`: k folds of women (both images of a woman in one fold), abnormal women spread evenly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medssl.mammo import PatchSampler
from napari_medssl.models.registry import create_model

_ENC = dict(embed_dim=128, depth=4, num_heads=4, in_chans=1)
_DEC = dict(decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "miram": (
        "miram_tiny",
        dict(
            img_size=128,
            scale=2,
            patch_size=4,
            hr_decoder_embed_dim=64,
            hr_decoder_depth=1,
            hr_decoder_num_heads=4,
            hr_attention="nystrom",
            hr_attention_kw={"num_landmarks": 32},
            **_ENC,
            **_DEC,
        ),
    ),
    "mae": ("mae_tiny", dict(img_size=128, patch_size=8, **_ENC, **_DEC)),
    "msmae": ("msmae_tiny", dict(img_size=128, patch_size=8, **_ENC, **_DEC)),
    "scratch": ("vit_tiny", dict(img_size=128, patch_size=8, **_ENC)),
    "cnn": ("cnn_tiny", dict(in_chans=1)),
}
#: methods trained from scratch, supervised only (no self-supervised pretraining)
SUPERVISED_ONLY = frozenset({"scratch", "cnn"})
#: methods whose encoder size the ``encoder`` overrides (embed_dim, depth, num_heads) set
VIT_METHODS = frozenset({"miram", "mae", "msmae", "scratch"})

Log = Callable[[str], Any] | None


def _schedule(opt: torch.optim.Optimizer, lr: float, step: int, total: int, warmup: int) -> None:
    if step < warmup:
        f = (step + 1) / warmup
    else:
        f = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for g in opt.param_groups:
        g["lr"] = lr * f


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1 and p.requires_grad]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def build(method: str, num_classes: int = 0, **encoder: Any) -> torch.nn.Module:
    """The method's model (``num_classes=0``: for pretraining; 2: a patch classifier); ``encoder`` overrides
    the encoder size (``embed_dim``, ``depth``, ``num_heads``) for every ViT method alike (the CNN ignores it)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    name, cfg = METHODS[method]
    if method not in VIT_METHODS:
        encoder = {}  # the CNN has its own fixed size
    return create_model(name, **{**cfg, **encoder}, num_classes=num_classes)


def _autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _loop(
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    log: Log,
    what: str,
) -> list[float]:
    opt = _optimizer(model, lr, weight_decay)
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        _schedule(opt, lr, step, steps, warmup)
        with _autocast(next(model.parameters()).device):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if hasattr(model, "on_train_step"):
            model.on_train_step(step + 1, steps)
        losses.append(float(loss.detach()))
        if log is not None and ((step + 1) % 25 == 0 or step + 1 == steps):
            log(f"{what} step {step + 1}/{steps} loss {np.mean(losses[-25:]):.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    return losses


def pretrain(
    method: str,
    sampler: PatchSampler,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 20,
    weight_decay: float = 0.05,
    log: Log = None,
    device: str | torch.device = "cpu",
    encoder: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Self-supervised pretraining of a method on unlabelled breast patches (its own objective)."""
    model = build(method, 0, **(encoder or {})).to(device)
    if not hasattr(model, "pretrain_loss"):
        raise ValueError(f"{method} has no self-supervised objective")

    def loss() -> torch.Tensor:
        x, _ = sampler.batch(batch_size, labelled=False)
        return model.pretrain_loss(x.to(device, non_blocking=True))["loss"]

    _loop(model, loss, steps, lr, warmup, weight_decay, log, f"pretrain {method}")
    return model


def classifier_from(
    method: str,
    pretrained: torch.nn.Module | None,
    encoder: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A 2-class patch classifier of ``method`` on ``device``; the pretrained weights that fit are copied in
    (the head and anything of another shape start fresh)."""
    model = build(method, 2, **(encoder or {}))
    if pretrained is not None:
        own = model.state_dict()
        fit = {k: v for k, v in pretrained.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fit, strict=False)
    return model.to(device)


@torch.no_grad()
def mine_hard_negatives(
    model: torch.nn.Module, sampler: PatchSampler, per_image: int = 4, stride: int = 64, batch_size: int = 64
) -> list[tuple[int, int, int]]:
    """The ``per_image`` normal-tissue windows of each training image that ``model`` scores most abnormal.

    Per image rather than overall because the image score is the mean of an image's best windows: what
    makes a normal breast look abnormal is its own top windows (dense tissue, vessels, the pectoral edge).
    Returns ``(image index, row, x)`` in the sampler's crops."""
    from napari_medssl.mammo import window_probabilities

    cands = sampler.normal_candidates(stride)
    if not cands:
        return []
    windows = np.stack([sampler.window_at(i, y, x) for i, y, x in cands])
    probs = window_probabilities(model, windows, batch_size)
    best: dict[int, list[tuple[float, tuple[int, int, int]]]] = {}
    for p, c in zip(probs, cands):
        best.setdefault(c[0], []).append((float(p), c))
    return [c for rows in best.values() for _, c in sorted(rows, reverse=True)[:per_image]]


def finetune(
    model: torch.nn.Module,
    sampler: PatchSampler,
    steps: int,
    batch_size: int = 32,
    lr: float = 5e-4,
    warmup: int = 10,
    weight_decay: float = 0.05,
    log: Log = None,
    what: str = "finetune",
    hard_rounds: int = 0,
    hard_fraction: float = 0.5,
    hard_per_image: int = 4,
) -> torch.nn.Module:
    """Train a patch classifier: finding patches (1) vs normal-tissue patches (0), cross-entropy.

    ``hard_rounds > 0``: hard-negative mining. The steps are cut into ``hard_rounds + 1`` equal parts; after
    each but the last, :func:`mine_hard_negatives` scores the training images' normal-tissue windows with the
    model as it is, and from then on ``hard_fraction`` of the normal patches come from each image's
    ``hard_per_image`` most abnormal-looking windows. Uses the training images only."""

    device = next(model.parameters()).device
    mine_at = {steps * (r + 1) // (hard_rounds + 1) for r in range(hard_rounds)} if hard_rounds > 0 else set()
    step = [0]

    def loss() -> torch.Tensor:
        if step[0] in mine_at:
            t0 = time.time()
            hard = mine_hard_negatives(model, sampler, hard_per_image)
            model.train()
            sampler.set_hard_negatives(hard, hard_fraction)
            if log is not None:
                log(f"{what} step {step[0]}: {len(hard)} hard negatives mined ({time.time() - t0:.0f} s)")
        step[0] += 1
        x, y = sampler.batch(batch_size, labelled=True)
        return F.cross_entropy(model(x.to(device, non_blocking=True)).float(), y.to(device))

    _loop(model, loss, steps, lr, warmup, weight_decay, log, what)
    return model


def woman_folds(
    ids: list[str], women: list[str], abnormal: list[bool], k: int = 5, seed: int = 0
) -> list[int]:
    """The fold (0..k-1) of each image: women shuffled, abnormal women dealt round-robin first, then the rest,
    so every fold holds about the same number of abnormal women and a woman's images share one fold."""
    if k < 2:
        raise ValueError(f"need k >= 2 folds, got {k}")
    by_woman: dict[str, bool] = {}
    for w, a in zip(women, abnormal):
        by_woman[w] = by_woman.get(w, False) or bool(a)
    if len(by_woman) < k:
        raise ValueError(f"{len(by_woman)} women cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    names = sorted(by_woman)
    order = [names[i] for i in rng.permutation(len(names))]
    ranked = [w for w in order if by_woman[w]] + [w for w in order if not by_woman[w]]
    fold_of = {w: i % k for i, w in enumerate(ranked)}
    return [fold_of[w] for w in women]
