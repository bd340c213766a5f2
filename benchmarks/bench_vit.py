"""ViT benchmarks, measured side by side in one run (interleaved repetitions, medians).

1. ``cls_attention`` (O(N) [CLS] row in the last block, fused kernel elsewhere) vs ``forward_features`` on a
   ViT-S/16 at 224², 512², 1024², batch 1: goal ≤ 1.05×. The explicit capture (full softmax(QKᵀ) in the last
   block, the way hooks on timm's non-fused path get it) is shown for reference.
2. MSMAE fine-tune step (forward + cross-entropy + backward + optimiser step) with mask-and-throw (25 % of the
   tokens through the encoder) vs the same step on all tokens, ViT-B/16 at 224², batch 16: goal ≤ 0.25×.

Run: ``.venv/bin/python benchmarks/bench_vit.py`` (``--help`` for sizes, repetitions, device).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from napari_medssl.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, repetitions interleaved so machine noise hits all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call (matmuls, convolutions, SDPA; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def explicit_last_block(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture the last block's full attention matrix on the non-fused path of a copy."""
    ref = copy.deepcopy(model)
    store: dict[str, torch.Tensor] = {}

    class Capture(torch.nn.Module):
        def forward(self, attn: torch.Tensor) -> torch.Tensor:
            store["attn"] = attn
            return attn

    ref.blocks[-1].attn.fused_attn = False
    ref.blocks[-1].attn.attn_drop = Capture()

    def run(x: torch.Tensor) -> torch.Tensor:
        ref.forward_features(x)
        return store.pop("attn")[:, :, 0, 1:]

    return run


@torch.no_grad()
def bench_cls_attention(sizes: list[int], reps: int, device: torch.device) -> None:
    model = create_model("vit_small", in_chans=3).to(device).eval()
    explicit = explicit_last_block(model)
    print("\n## cls_attention vs forward_features, ViT-S/16, batch 1, fp32")
    print(
        "| input | tokens | forward_features | cls_attention | time ratio | FLOP ratio "
        "| explicit last-block capture | time ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in sizes:
        x = torch.rand(1, 3, s, s, device=device)
        t = interleaved(
            {
                "feat": lambda x=x: model.forward_features(x),
                "cls": lambda x=x: model.cls_attention(x),
                "explicit": lambda x=x: explicit(x),
            },
            reps,
            device,
        )
        n = (s // 16) ** 2
        flop_ratio = flops(lambda x=x: model.cls_attention(x)) / flops(lambda x=x: model.forward_features(x))
        print(
            f"| {s}² | {n} | {t['feat'] * 1e3:.0f} ms | {t['cls'] * 1e3:.0f} ms | {t['cls'] / t['feat']:.2f}× "
            f"| {flop_ratio:.3f}× | {t['explicit'] * 1e3:.0f} ms | {t['explicit'] / t['feat']:.2f}× |"
        )


def bench_msmae_step(name: str, batch: int, reps: int, device: torch.device) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=3).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, *model.input_size, device=device)
    y = torch.randint(0, 5, (batch,), device=device)
    model(x)  # the first training call refreshes the attention prior

    def step(forward: Callable[[], torch.Tensor], with_opt: bool) -> None:
        loss = F.cross_entropy(forward(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if with_opt:
            opt.step()

    def masked() -> torch.Tensor:
        return model(x)  # train mode: mask-and-throw, 25 % of the tokens

    def full() -> torch.Tensor:
        return model.forward_head(model.forward_features(x))

    t = interleaved(
        {
            "full": lambda: step(full, True),
            "masked": lambda: step(masked, True),
            "full_fb": lambda: step(full, False),
            "masked_fb": lambda: step(masked, False),
        },
        reps,
        device,
    )
    flop_ratio = flops(lambda: step(masked, False)) / flops(lambda: step(full, False))
    print(
        f"\n## MSMAE fine-tune step, {name} ({model.input_size[0]}², patch {model.patch_size}), batch {batch}"
    )
    print("| | all tokens | 25 % tokens (mask-and-throw) | time ratio | FLOP ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| forward + backward + AdamW step | {t['full']:.3f} s | {t['masked']:.3f} s "
        f"| {t['masked'] / t['full']:.3f}× | |"
    )
    print(
        f"| forward + backward | {t['full_fb']:.3f} s | {t['masked_fb']:.3f} s "
        f"| {t['masked_fb'] / t['full_fb']:.3f}× | {flop_ratio:.3f}× |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--msmae", default="msmae_base", help="registered MSMAE model for the step benchmark")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", choices=["attention", "msmae"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    if args.skip != "attention":
        bench_cls_attention(args.sizes, args.reps, device)
    if args.skip != "msmae":
        bench_msmae_step(args.msmae, args.batch, args.reps, device)


if __name__ == "__main__":
    main()
