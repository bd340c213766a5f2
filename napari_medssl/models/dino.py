"""DINO: self-distillation with no labels (Caron et al. 2021, https://arxiv.org/abs/2104.14294).

A student ViT and an EMA teacher ViT (same architecture) each end in a projection head (MLP → bottleneck →
weight-normalised linear layer with ``K`` outputs). The teacher sees the 2 global crops, the student sees all
crops (2 global + several local); the student's softmax (temperature 0.1) is pulled towards the teacher's
centred, sharpened softmax (temperature 0.04 → 0.07) by cross-entropy over every (teacher crop, other crop)
pair. The centre is an EMA of the teacher's outputs; the teacher is an EMA of the student, with a momentum
rising from 0.996 to 1 on a cosine (both updated in :meth:`DINO.on_train_step`).

The crops are made on the device, inside :meth:`DINO.pretrain_loss`, from the batch the engine hands over, so
the engine stays generic: random resized crops, flips and an intensity jitter suited to gray medical images
(contrast, brightness, gamma, Gaussian blur and noise; no colour jitter, no solarisation).

Elsewhere: the attention maps every ViT overlay uses (:mod:`napari_medssl.models.attention`) and the importer
of official DINO checkpoints (:mod:`napari_medssl.models.dino_import`).

Axis legend: B batch, C channels, Y X space, N tokens, E embedding, H heads, K head outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

# the attention maps live in models.attention; re-exported here, their old place
from napari_medssl.models.attention import attention_grid, attention_maps, shape_attention  # noqa: F401
from napari_medssl.models.layers.patch_embed import to_2tuple
from napari_medssl.models.registry import register_model
from napari_medssl.models.vit import VisionTransformer

__all__ = [
    "DINO",
    "DINOHead",
    "attention_maps",
    "dino_loss",
    "dino_small",
    "dino_tiny",
    "multi_crop",
]


# -- projection head ----------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """DINO projection head: MLP → L2-normalised bottleneck → weight-normalised linear layer.

    Args:
        in_dim: input size ``E``.
        out_dim: number of prototypes ``K`` (paper: 65536).
        hidden_dim: MLP width (paper: 2048).
        bottleneck_dim: bottleneck size (paper: 256).
        nlayers: linear layers in the MLP (≥ 1).
        norm_last_layer: fix the weight-norm gain at 1 (the paper's default; stabilises training).
        use_bn: BatchNorm1d after each hidden linear layer (the official code's ``--use_bn_in_head``). It
            standardises the features across the batch, so small differences between images survive
            DINO's centring (see :class:`DINO`'s ``head_use_bn``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, E) -> (B, K)``."""
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


# -- multi-crop augmentation, on the device -----------------------------------------------------------------
def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_resized_crops(
    x: torch.Tensor,
    size: int | tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One random resized crop per image, with a random horizontal flip (torchvision's recipe, batched).

    Args:
        x: ``(B, C, Y, X)`` images.
        size: output ``(Y', X')`` (or one side for square crops).
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height in pixels) relative to the output's ``X'/Y'``.
        generator: CPU generator for the crop parameters (reproducible on any device).

    Returns:
        ``(B, C, Y', X')``, bilinear resampling.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    b, _, h, w = x.shape
    area = _uniform(b, *scale, generator)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_r) * (out_w / out_h) * (h / w)  # crop width / height as fractions of the sides
    fw = torch.sqrt(area * aspect).clamp(max=1.0)
    fh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - fw) * (2 * torch.rand(b, generator=generator) - 1)  # centre in [-1, 1] coordinates
    cy = (1 - fh) * (2 * torch.rand(b, generator=generator) - 1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = fw * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = fh
    theta[:, 1, 2] = cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [b, x.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` (pixels) per image: ``(B, C, Y, X)`` -> same."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(device=x.device, dtype=x.dtype).clamp_min(1e-3)
    k = torch.exp(-0.5 * (t[None] / s[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·C, 2r+1)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def intensity_jitter(
    x: torch.Tensor,
    blur_p: float,
    jitter_p: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gray-image photometric augmentation, per image: contrast, brightness, gamma, blur, noise.

    Args:
        x: ``(B, C, Y, X)`` in [0, 1].
        blur_p: probability of a Gaussian blur (σ from 0.1 to 2 pixels at 224², scaled with the side).
        jitter_p: probability of the contrast/brightness/gamma jitter (factors 0.6–1.4, 0.6–1.4, 0.7–1.5).
        generator: CPU generator for the parameters.

    Returns:
        ``(B, C, Y, X)`` clamped to [0, 1].
    """
    b = x.shape[0]

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=x.device, dtype=x.dtype).view(b, 1, 1, 1)

    on = torch.rand(b, generator=generator) < jitter_p
    contrast = torch.where(on, _uniform(b, 0.6, 1.4, generator), torch.ones(b))
    brightness = torch.where(on, _uniform(b, 0.6, 1.4, generator), torch.ones(b))
    gamma = torch.where(on, torch.exp(_uniform(b, math.log(0.7), math.log(1.5), generator)), torch.ones(b))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * per_image(contrast) + mean) * per_image(brightness)
    x = x.clamp(0, 1).pow(per_image(gamma))
    blur = torch.rand(b, generator=generator) < blur_p
    if bool(blur.any()):
        sigma = _uniform(b, 0.1, 2.0, generator) * x.shape[-1] / 224
        x = torch.where(per_image(blur) > 0, _gaussian_blur(x, sigma), x)
    noise_std = _uniform(b, 0.0, 0.03, generator)
    if generator is None:
        noise = torch.randn_like(x)
    else:
        noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    return (x + per_image(noise_std) * noise).clamp(0, 1)


def multi_crop(
    x: torch.Tensor,
    global_size: int | tuple[int, int],
    local_size: int | tuple[int, int],
    n_local: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """DINO's views of a batch: 2 global crops ``(B, C, *global_size)`` then ``n_local`` local crops.

    Blur probabilities follow the paper (1.0 and 0.1 for the two global views, 0.5 for local ones).
    """
    views = []
    for i in range(2):
        crop = random_resized_crops(x, global_size, global_scale, generator=generator)
        views.append(intensity_jitter(crop, blur_p=(1.0, 0.1)[i], generator=generator))
    for _ in range(n_local):
        crop = random_resized_crops(x, local_size, local_scale, generator=generator)
        views.append(intensity_jitter(crop, blur_p=0.5, generator=generator))
    return views


# -- loss ---------------------------------------------------------------------------------------------------
def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """Cross-entropy between the teacher's centred, sharpened softmax and the student's, over crop pairs.

    Args:
        student_out: ``(n_crops·B, K)`` student head outputs, crop-major (global crops first).
        teacher_out: ``(2·B, K)`` teacher head outputs on the 2 global crops.
        center: ``(1, K)`` running centre of the teacher outputs.
        n_crops: total number of crops (2 global + local).
        student_temp: student softmax temperature.
        teacher_temp: teacher softmax temperature (sharpening).

    Returns:
        Scalar loss averaged over the ``2·(n_crops − 1)`` (teacher crop, different student crop) pairs.
    """
    log_p = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    q = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = student_out.new_zeros((), dtype=torch.float32), 0
    for iq, q_i in enumerate(q):
        for v, log_p_v in enumerate(log_p):
            if v == iq:
                continue
            total = total + torch.sum(-q_i * log_p_v, dim=-1).mean()
            terms += 1
    return total / terms


# -- model --------------------------------------------------------------------------------------------------
class DINO(nn.Module):
    """DINO self-distillation around two :class:`~napari_medssl.models.vit.VisionTransformer` s.

    ``num_classes == 0`` (task ``"pretrain"``): the student and its head train; the teacher (``backbone``) and
    its head are EMA copies with ``requires_grad=False``; ``forward(x)`` returns the teacher's pooled features
    ``(B, E)``. ``num_classes > 0`` (task ``"classify"``, fine-tuning): ``forward(x)`` returns logits from a
    linear head on the teacher; the teacher trains, the projection heads and the student stay (so pretraining
    checkpoints load) but are frozen, and the EMA hook does nothing.

    Args:
        img_size: global crop / input size ``(Y, X)`` the model is built for.
        patch_size: ViT patch side.
        in_chans: image channels ``C``.
        embed_dim, depth, num_heads, mlp_ratio: ViT size.
        num_classes: ``K`` of the fine-tuning head; 0 for pretraining.
        global_pool: ``"token"`` or ``"avg"``, for features and the fine-tuning head.
        drop_path_rate: stochastic depth of the trained ViT (the student, or the teacher when fine-tuning).
        out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer: :class:`DINOHead`.
        head_use_bn: BatchNorm in both projection heads (:class:`DINOHead` ``use_bn``); the teacher's head then
            normalises with the batch's statistics, as the student's does (it stays in training mode, like the
            official code's teacher). On small, alike medical images a fresh ViT gives nearly the same [CLS]
            feature for every image (cosine ≈ 0.99 here), which centring turns into a uniform teacher: the
            batch normalisation keeps the differences between images.
        n_local_crops: local crops per image (paper: 8 at 96² next to 224² global crops).
        local_size: local crop ``(Y, X)`` or side; default ``3/7`` of the global size rounded to the patch
            size (the paper's 96 for 224).
        global_size: global crop ``(Y, X)`` or side, default ``img_size``. Smaller than ``img_size`` (the size
            the engine resizes whole images to), crops keep finer detail: e.g. 128-px crops of 256-px images
            for maps read at higher resolution.
        global_scale, local_scale: crop area ranges.
        student_temp: student softmax temperature.
        warmup_teacher_temp, teacher_temp: teacher temperature, warmed up linearly over
            ``warmup_teacher_frac`` of the training steps.
        center_momentum: EMA momentum of the centre.
        momentum_teacher: base EMA momentum of the teacher (cosine schedule to 1).
    """

    spatial_dims = 2

    def __init__(
        self,
        img_size: int | Sequence[int] = 64,
        patch_size: int = 8,
        in_chans: int = 1,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        global_pool: str = "token",
        drop_path_rate: float = 0.1,
        out_dim: int = 4096,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        head_use_bn: bool = False,
        n_local_crops: int = 4,
        local_size: int | Sequence[int] | None = None,
        global_size: int | Sequence[int] | None = None,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_frac: float = 0.3,
        center_momentum: float = 0.9,
        momentum_teacher: float = 0.996,
    ) -> None:
        super().__init__()
        if n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}")
        img_size = tuple(img_size) if isinstance(img_size, Sequence) else img_size
        vit_kw = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            global_pool=global_pool,
        )
        head_kw = dict(
            in_dim=embed_dim,
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            nlayers=head_layers,
            norm_last_layer=norm_last_layer,
            use_bn=head_use_bn,
        )
        self.num_classes = num_classes
        self.task = "classify" if num_classes > 0 else "pretrain"
        self._build_networks(vit_kw, head_kw, drop_path_rate)
        self.in_chans = in_chans
        self.input_size = self.teacher.input_size
        self.patch_size = patch_size
        self._set_crops(global_size, local_size, n_local_crops, global_scale, local_scale)
        self.head_use_bn = head_use_bn
        self.student_temp = student_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.final_teacher_temp = teacher_temp
        self.warmup_teacher_frac = warmup_teacher_frac
        self.center_momentum = center_momentum
        self.momentum_base = momentum_teacher
        self.teacher_temp = warmup_teacher_temp  # current value, advanced by on_train_step
        self.momentum = momentum_teacher
        self.train()

    def _build_networks(self, vit_kw: dict[str, Any], head_kw: dict[str, Any], drop_path_rate: float) -> None:
        """Create student, teacher and their heads (in this order: seeded runs rely on it), start the teacher
        equal to the student, register the centre and freeze what does not learn."""
        pretrain = self.task == "pretrain"
        self.student = VisionTransformer(**vit_kw, drop_path_rate=drop_path_rate)
        self.teacher = VisionTransformer(
            **vit_kw, num_classes=self.num_classes, drop_path_rate=0.0 if pretrain else drop_path_rate
        )
        self.student_head = DINOHead(**head_kw)
        self.teacher_head = DINOHead(**head_kw)
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)  # equal start (bar the head)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.register_buffer("center", torch.zeros(1, head_kw["out_dim"]))
        frozen = (
            (self.teacher, self.teacher_head)
            if pretrain
            else (self.student, self.student_head, self.teacher_head)
        )
        for module in frozen:
            module.requires_grad_(False)

    def _set_crops(
        self,
        global_size: int | Sequence[int] | None,
        local_size: int | Sequence[int] | None,
        n_local_crops: int,
        global_scale: Sequence[float],
        local_scale: Sequence[float],
    ) -> None:
        """Resolve the multi-crop geometry: global/local crop sizes (local defaults to 3/7 of the global size
        rounded to the patch size), the number of local crops and the crop area ranges."""
        patch_size = self.patch_size
        self.global_size = (
            self.input_size
            if global_size is None
            else to_2tuple(global_size if isinstance(global_size, int) else tuple(global_size), "global_size")
        )
        if local_size is None:
            local_size = tuple(
                max(patch_size, round(s * 3 / 7 / patch_size) * patch_size) for s in self.global_size
            )
        self.local_size = to_2tuple(
            local_size if isinstance(local_size, int) else tuple(local_size), "local_size"
        )
        self.n_local_crops = n_local_crops
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)

    @property
    def backbone(self) -> VisionTransformer:
        """The ViT whose attention the maps show: the teacher."""
        return self.teacher

    def train(self, mode: bool = True) -> DINO:
        """Set train/eval mode; while pretraining the EMA teacher always stays in eval mode."""
        super().train(mode)
        if self.task == "pretrain":
            self.teacher.eval()
            if not self.head_use_bn:  # with BatchNorm the teacher's head uses batch statistics
                self.teacher_head.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, Y, X)`` -> logits ``(B, K)`` (classify) or the teacher's pooled features ``(B, E)``."""
        return self.teacher(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's normed tokens ``(B, 1 + N, E)``."""
        return self.teacher.forward_features(x)

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's last-block [CLS]→patch attention ``(B, H, gh, gw)``."""
        return self.teacher.cls_attention(x)

    def pretrain_loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Multi-crop self-distillation loss on a batch of images.

        Args:
            x: ``(B, C, Y, X)`` images in [0, 1], any size (``input_size`` or larger: crops are resampled to
                the global and local crop sizes); crops are made here, on ``x``'s device.
            y: ignored (DINO uses no labels).
            generator: CPU generator for the crop and jitter parameters.

        Returns:
            ``{"loss", "teacher_entropy"}``: the loss and the mean entropy of the teacher's softmax (near 0 or
            near ``log K`` signals collapse). In training mode the centre is updated from this batch.
        """
        if self.task != "pretrain":
            raise ValueError(
                "pretrain_loss needs a pretraining DINO (num_classes=0); this one is a classifier"
            )
        views = multi_crop(
            x,
            self.global_size,
            self.local_size,
            self.n_local_crops,
            self.global_scale,
            self.local_scale,
            generator=generator,
        )
        globals_ = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher_head(
                self.teacher.forward_head(self.teacher.forward_features(globals_))
            )
        student_feats = [self.student.forward_head(self.student.forward_features(globals_), pre_logits=True)]
        if self.n_local_crops:
            locals_ = torch.cat(views[2:])
            student_feats.append(
                self.student.forward_head(self.student.forward_features(locals_), pre_logits=True)
            )
        student_out = self.student_head(torch.cat(student_feats))
        loss = dino_loss(
            student_out, teacher_out, self.center, len(views), self.student_temp, self.teacher_temp
        )
        with torch.no_grad():
            q = F.softmax((teacher_out.float() - self.center) / self.teacher_temp, dim=-1)
            entropy = -(q * q.clamp_min(1e-12).log()).sum(dim=-1).mean()
            if self.training:
                self._update_center(teacher_out)
        return {"loss": loss, "teacher_entropy": entropy}

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            torch.distributed.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

    @torch.no_grad()
    def on_train_step(self, step: int, total_steps: int) -> None:
        """After optimiser step ``step`` (1-based) of ``total_steps``: EMA-update the teacher, then advance the
        momentum (cosine ``m₀ → 1``) and teacher temperature (linear warm-up) schedules. No-op when fine-tuning.
        """
        if self.task != "pretrain":
            return
        frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
        self.momentum = 1 - (1 - self.momentum_base) * (math.cos(math.pi * frac) + 1) / 2
        for src, dst in ((self.student, self.teacher), (self.student_head, self.teacher_head)):
            src_params = dict(src.named_parameters())
            pairs = [(p, src_params[n].detach()) for n, p in dst.named_parameters() if n in src_params]
            torch._foreach_lerp_([t for t, _ in pairs], [s for _, s in pairs], 1 - self.momentum)
        warm = self.warmup_teacher_frac
        ramp = min(frac / warm, 1.0) if warm > 0 else 1.0
        self.teacher_temp = self.warmup_teacher_temp + ramp * (
            self.final_teacher_temp - self.warmup_teacher_temp
        )


# -- attention maps (napari_medssl.models.attention, re-exported for callers of the old place) ---------------

# -- registered sizes ---------------------------------------------------------------------------------------
_TINY = dict(
    img_size=64,
    patch_size=8,
    embed_dim=192,
    depth=6,
    num_heads=3,
    out_dim=4096,
    hidden_dim=512,
    bottleneck_dim=128,
)
_SMALL = dict(
    img_size=224,
    patch_size=16,
    embed_dim=384,
    depth=12,
    num_heads=6,
    out_dim=65536,
    hidden_dim=2048,
    bottleneck_dim=256,
    n_local_crops=8,
    local_size=96,
)


@register_model
def dino_tiny(**overrides: Any) -> DINO:
    """DINO for 2 CPU cores: ViT E 192, depth 6, 3 heads, patch 8 on 64² global / 32² local crops, K 4096."""
    return DINO(**{**_TINY, **overrides})


@register_model
def dino_small(**overrides: Any) -> DINO:
    """Paper-sized DINO ViT-S/16 (E 384, depth 12, 6 heads) on 224² / 8 × 96² crops, K 65536."""
    return DINO(**{**_SMALL, **overrides})
