"""Side-by-side cost of the four segmenter families on real hippocampus MRI (and optionally a quick Dice race).

For every model: parameters, forward FLOPs (``FlopCounterMode``), median CPU latency at batch 1, and the peak
bytes held by PyTorch's CPU allocator during one inference pass and during one training step (forward +
backward), read from the profiler's allocation records (deterministic, unlike process RSS). 2D models run on one
``35×51`` slice, 3D models on the whole ``35×51×35`` volume; each family at the chosen size tier.

``--dice-steps N`` also trains the 2D ``unet`` and ``emfformer`` of that tier for ``N`` steps on slices of 40
training volumes with the same recipe and reports the mean foreground Dice on 20 held-out volumes.

``--device cuda`` measures on the GPU instead: latency between CUDA synchronisations, peak memory from the CUDA
caching allocator's counters (``max_memory_allocated`` above what was held before the pass).

``--emf-set KEY=VALUE`` builds every EMF-former row with that option (the zoo model's decoder: ``--emf-set
detail_dim=16``), as ``medssl finetune --set`` does.

Run: ``.venv/bin/python benchmarks/bench_segmenters.py [--size tiny] [--dice-steps 600] [--device cuda]``
(data: ``$MEDSSL_DATA_DIR/hippocampus``, default ``../shared/data``)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from napari_medssl.models import create_model, list_models
from napari_medssl.transforms import normalize_intensity

DATA = (
    Path(os.environ.get("MEDSSL_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    / "hippocampus"
)
DEVICE = torch.device("cpu")  # set by --device
EMF_KW: dict = {}  # --emf-set: EMF-former options (the zoo model's decoder, e.g. detail_dim=16)


def _emf_label(name: str) -> str:
    return name + "".join(f", {k}={v}" for k, v in EMF_KW.items())


def load_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``i``-th hippocampus volume (normalised to [0, 1]) and its label volume, ``(35, 51, 35)``-ish."""
    path = sorted((DATA / "imagesTr").glob("*.nii.gz"))[i]
    image = normalize_intensity(np.asarray(nib.load(path).dataobj))
    label = np.asarray(nib.load(DATA / "labelsTr" / path.name).dataobj).astype(np.int64)
    return image, label


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def peak_alloc_bytes(fn) -> int:
    """Peak of live bytes in PyTorch's allocator while ``fn()`` runs, above what was held before it: on the CPU
    from the profiler's allocation records (allocations minus frees, in order), on CUDA from its counters."""
    if DEVICE.type == "cuda":
        _sync()
        before = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        fn()
        _sync()
        return torch.cuda.max_memory_allocated(DEVICE) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for e in prof.events():
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start, d))
    cur = peak = 0
    for _, d in sorted(deltas):
        cur += d
        peak = max(peak, cur)
    return peak


def measure(name: str, spatial_dims: int, x: torch.Tensor, repeats: int, **kw) -> dict:
    """Parameters, FLOPs, latency and peak memory of one model on one input (``kw``: model options)."""
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=spatial_dims, **kw) if spatial_dims else create_model(name, **kw)
    model.to(DEVICE)
    x = x.to(DEVICE)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(x)
        assert out.shape[2:] == x.shape[2:], (name, out.shape, x.shape)
        times = []
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            model(x)
            _sync()
            times.append(time.perf_counter() - t0)
        infer_peak = peak_alloc_bytes(lambda: model(x))
    model.train()

    def step() -> None:
        model(x).square().mean().backward()

    step()
    train_peak = peak_alloc_bytes(step)
    return {
        "params": params,
        "gflops": counter.get_total_flops() / 1e9,
        "ms": 1e3 * statistics.median(times),
        "infer_mb": infer_peak / 2**20,
        "train_mb": train_peak / 2**20,
    }


def cost_table(size: str, repeats: int) -> None:
    image, _ = load_case(0)
    slice_2d = torch.from_numpy(image[:, :, image.shape[2] // 2].copy())[None, None]  # (1, 1, 35, 51)
    volume = torch.from_numpy(image)[None, None]  # (1, 1, 35, 51, 35)
    rows = []
    for family, dims_list in (("unet", (2, 3)), ("emfformer", (2, 3)), ("mim", (3,)), ("dinocnn", (2,))):
        names = [n for n in list_models(family) if n.endswith(f"_{size}")] or [
            n for n in list_models(family) if n.endswith("_tiny")
        ]
        for name in names:
            for dims in dims_list:
                x = slice_2d if dims == 2 else volume
                kwargs_dims = dims if family in ("unet", "emfformer") else 0
                kw = EMF_KW if family == "emfformer" else {}
                label = _emf_label(name) if family == "emfformer" else name
                rows.append((label, dims, tuple(x.shape[2:]), measure(name, kwargs_dims, x, repeats, **kw)))
    print(
        f"\n| model | input | params | GFLOPs | {DEVICE.type.upper()} ms (median of {repeats}) | inference peak MiB | train-step peak MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, dims, shape, r in rows:
        print(
            f"| {name} ({dims}D) | {'×'.join(map(str, shape))} | {r['params'] / 1e6:.2f} M | {r['gflops']:.3f} | "
            f"{r['ms']:.1f} | {r['infer_mb']:.2f} | {r['train_mb']:.2f} |"
        )
    base = {dims: r for name, dims, _, r in rows if name.startswith("unet")}
    for name, dims, _, r in rows:
        if name.startswith("emfformer"):
            u = base[dims]
            print(
                f"{name} {dims}D / U-Net: FLOPs {r['gflops'] / u['gflops']:.3f}, inference peak "
                f"{r['infer_mb'] / u['infer_mb']:.3f}, train-step peak {r['train_mb'] / u['train_mb']:.3f}, "
                f"latency {r['ms'] / u['ms']:.3f}"
            )
    recompute_cost(slice_2d, volume, repeats)


def zoo_3d_table(repeats: int) -> None:
    """The zoo's 3D recipe: EMF-former tiny (3D) vs the 3-level 3D U-Net of ``unet_tiny_3d_hippocampus``, on a
    whole volume (batch 1, inference as in the viewer) and on one training batch (8 crops of 40×56×40)."""
    image, _ = load_case(0)
    inputs = {
        "volume 35×51×35": torch.from_numpy(image)[None, None],
        "8 crops 40×56×40": torch.from_numpy(np.resize(image, (8, 1, 40, 56, 40)).astype(np.float32)),
    }
    print("\n| model (3D) | input | params | GFLOPs | ms | inference peak MiB | train-step peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for label, x in inputs.items():
        u = measure("unet_tiny", 3, x, repeats, levels=3)
        e = measure("emfformer_tiny", 3, x, repeats, **EMF_KW)
        for name, r in (("unet_tiny, 3 levels", u), (_emf_label("emfformer_tiny"), e)):
            print(
                f"| {name} | {label} | {r['params'] / 1e6:.2f} M | {r['gflops']:.2f} | {r['ms']:.0f} | "
                f"{r['infer_mb']:.2f} | {r['train_mb']:.2f} |"
            )
        print(
            f"{_emf_label('emfformer_tiny')} 3D / 3-level U-Net on {label}: FLOPs {e['gflops'] / u['gflops']:.3f}, inference peak "
            f"{e['infer_mb'] / u['infer_mb']:.3f}, train-step peak {e['train_mb'] / u['train_mb']:.3f}"
        )


def recompute_cost(slice_2d: torch.Tensor, volume: torch.Tensor, repeats: int) -> None:
    """EMF-former's training step with its Mix-FFN hidden maps recomputed (default) vs stored, side by side
    (the two steps alternate, so drifting machine load hits both alike)."""
    for dims, x in ((2, slice_2d.repeat(16, 1, 1, 1)), (3, volume)):
        steps, times, peaks = {}, {False: [], True: []}, {}
        for recompute in (False, True):
            torch.manual_seed(0)
            model = (
                create_model("emfformer_tiny", spatial_dims=dims, recompute_ffn=recompute, **EMF_KW)
                .train()
                .to(DEVICE)
            )
            x = x.to(DEVICE)

            def step(model=model, x=x) -> None:
                model(x).square().mean().backward()

            step()
            steps[recompute] = step
            peaks[recompute] = peak_alloc_bytes(step) / 2**20
        for _ in range(3 * repeats):
            for recompute in (False, True):
                _sync()
                t0 = time.perf_counter()
                steps[recompute]()
                _sync()
                times[recompute].append(time.perf_counter() - t0)
        ms0, ms1 = (statistics.median(times[r]) * 1e3 for r in (False, True))
        mb0, mb1 = peaks[False], peaks[True]
        print(
            f"emfformer_tiny {dims}D train step (batch {len(x)}), Mix-FFN recomputed vs stored: "
            f"peak {mb1:.2f} vs {mb0:.2f} MiB ({mb1 / mb0:.3f}x), time {ms1:.1f} vs {ms0:.1f} ms ({ms1 / ms0:.3f}x)"
        )


def train_step_time(repeats: int, teacher: str) -> None:
    """The zoo's 2D training step (batch 16 of 64×48, CE + soft Dice, AdamW): U-Net tiny vs EMF-former tiny,
    alone and with a distillation teacher's forward pass and KL term, the three steps alternating; then each
    step's peak allocator bytes (the teacher's forward included in the third)."""
    from napari_medssl.engine.build import resolve_checkpoint
    from napari_medssl.engine.loop import LossModule
    from napari_medssl.models import load_model

    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 64, 48), torch.randint(0, 3, (16, 64, 48))
    unet, emf = create_model("unet_tiny").train(), create_model("emfformer_tiny", **EMF_KW).train()
    frozen = load_model(resolve_checkpoint(teacher)).eval().requires_grad_(False)
    optims = {id(m): torch.optim.AdamW(m.parameters()) for m in (unet, emf)}

    def step(model: torch.nn.Module, distil: bool = False) -> None:
        loss = LossModule(model, "segment", teacher=frozen if distil else None)(x, y)  # the engine's loss
        optims[id(model)].zero_grad()
        loss.backward()
        optims[id(model)].step()

    steps = {
        "unet_tiny": lambda: step(unet),
        _emf_label("emfformer_tiny"): lambda: step(emf),
        f"{_emf_label('emfformer_tiny')} + teacher {teacher}": lambda: step(emf, True),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    peaks = {name: peak_alloc_bytes(fn) / 2**20 for name, fn in steps.items()}
    base, base_mb = statistics.median(times["unet_tiny"]), peaks["unet_tiny"]
    for name, ts in times.items():
        print(
            f"train step {name}: {1e3 * statistics.median(ts):.1f} ms ({statistics.median(ts) / base:.3f}x U-Net), "
            f"peak {peaks[name]:.2f} MiB ({peaks[name] / base_mb:.3f}x)"
        )


def dice_race(size: str, steps: int, batch: int = 16) -> None:
    """Train 2D ``unet`` and ``emfformer`` of one tier identically; mean foreground Dice on held-out volumes."""
    cases = [load_case(i) for i in range(60)]
    train, val = cases[:40], cases[40:]
    slices = [(im[:, :, k], lb[:, :, k]) for im, lb in train for k in range(im.shape[2])]  # 2D (Y, X) slices
    ny, nx = (max(s[0].shape[a] for s in slices) for a in (0, 1))

    def padded(a: np.ndarray) -> np.ndarray:
        return np.pad(a, [(0, ny - a.shape[0]), (0, nx - a.shape[1])])

    xs_t = torch.from_numpy(np.stack([padded(im) for im, _ in slices]))[:, None]  # (S, 1, Y, X)
    ys_t = torch.from_numpy(np.stack([padded(lb) for _, lb in slices]))  # (S, Y, X)
    for family in ("unet", "emfformer"):
        torch.manual_seed(0)
        model = create_model(f"{family}_{size}", **(EMF_KW if family == "emfformer" else {}))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(xs_t), (batch,), generator=gen)
            x, y = xs_t[idx], ys_t[idx]
            flip = torch.rand(batch, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], y.flip(-1), y)
            logits = model(x)
            prob = logits.softmax(1)
            onehot = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
            inter = (prob * onehot).sum((0, 2, 3))
            soft_dice = (2 * inter + 1) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
            loss = F.cross_entropy(logits, y) + 1 - soft_dice[1:].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        train_s = time.perf_counter() - t0
        model.eval()
        dices = []
        with torch.no_grad():
            for image, label in val:
                x = torch.from_numpy(np.moveaxis(image, 2, 0).copy())[:, None]
                pred = model(x).argmax(1).numpy()
                lab = np.moveaxis(label, 2, 0)
                for k in (1, 2):
                    denom = (pred == k).sum() + (lab == k).sum()
                    dices.append(2 * ((pred == k) & (lab == k)).sum() / denom if denom else 1.0)
        print(
            f"{family}_{size}: {steps} steps in {train_s:.0f} s, val mean foreground Dice {np.mean(dices):.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", default="tiny", help="size tier: tiny, small or base (families lacking it use tiny)"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--dice-steps", type=int, default=0, help="also train 2D unet vs emfformer this many steps"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 keeps a shared machine sane)"
    )
    parser.add_argument(
        "--zoo-3d", action="store_true", help="only the zoo's 3D recipe: EMF-former vs the 3-level 3D U-Net"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (cost table only; the Dice race runs on the CPU)"
    )
    parser.add_argument(
        "--emf-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="EMF-former option for every EMF row, JSON value (the zoo model's: --emf-set detail_dim=16)",
    )
    parser.add_argument(
        "--train-step",
        metavar="TEACHER",
        help="only time the zoo's 2D training step: U-Net vs EMF-former, alone and distilled from TEACHER",
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    from napari_medssl.engine.cli import _overrides

    EMF_KW.update(_overrides(args.emf_set))
    torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {where}")
    if args.zoo_3d:
        zoo_3d_table(args.repeats)
        return
    if args.train_step:
        train_step_time(args.repeats, args.train_step)
        return
    cost_table(args.size, args.repeats)
    if args.dice_steps:
        dice_race(args.size, args.dice_steps)


if __name__ == "__main__":
    main()
