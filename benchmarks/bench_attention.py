"""One attention layer, forward + backward: time and peak memory of each linear kind vs exact ``sdpa``.

    .venv/bin/python benchmarks/bench_attention.py --sizes 1024 4096 16384 65536

Layer: ``make_attention(kind, 256, 4)`` with default options, batch 1, fp32, CPU, input and output
gradients as in training (``x.requires_grad``; ``y.backward(g)``).

Each (kind, N) case runs in a fresh subprocess, so no allocation of one case inflates another's peak.
Times: the median of ``--repeats`` passes after a warm-up pass (a case whose warm-up pass alone takes
longer than 10 s is timed by that pass; an sdpa case estimated over 60 s runs only once, as its memory
pass). Peak memory is read from the kernel, not from Python, as the median of three more passes (one for
those slow sdpa cases; it varies by ±10–20 % from pass to pass, even within one process). For them the
worker switches glibc to one mapping per allocation of 64 KiB or more (``mallopt``), so every freed
tensor buffer goes straight back to the kernel and the resident set tracks the live tensors; before each
pass it trims the heap, resets the resident-set high-water mark (``echo 5 > /proc/self/clear_refs``) and
then reports ``VmHWM − VmRSS at the reset`` from ``/proc/self/status``. Layer, input ``x`` and upstream
gradient ``g`` exist before the reset and do not count; the output, every activation and every gradient
(input and parameters, freed before each pass) do. Exact ``sdpa`` is skipped where its time, extrapolated
as N² from the previous size, would exceed ``--time-limit`` seconds; the table says so. The ratios are
sdpa / kind for time (speed-up) and kind / sdpa for memory.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINEAR_KINDS = ("nystrom", "performer", "linformer")
_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def run_case(kind: str, n: int, repeats: int, dim: int, heads: int, single_pass: bool) -> dict:
    """Worker body: time and peak memory of one case in this (fresh) process."""
    import torch

    from napari_medssl.models.layers import make_attention

    torch.manual_seed(0)
    layer = make_attention(kind, dim, heads)
    x = torch.randn(1, n, dim, requires_grad=True)
    g = torch.randn(1, n, dim)

    def step() -> float:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        layer(x).backward(g)
        return time.perf_counter() - t0

    layer(torch.randn(1, min(n, 256), dim, requires_grad=True)).sum().backward()  # load kernels, thread pool
    times = []
    if not single_pass:
        times = [step()]
        if times[0] < 10:
            times = sorted(step() for _ in range(repeats))

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)  # from now on every tensor buffer is its own mapping
    peaks = []
    for _ in range(1 if single_pass else 3):
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        rss0 = _status_kib("VmRSS")
        memory_pass_s = step()
        peaks.append((_status_kib("VmHWM") - rss0) / 1024)
    peak_mib = sorted(peaks)[len(peaks) // 2]
    time_s = times[len(times) // 2] if times else memory_pass_s
    return {"kind": kind, "n": n, "time_s": time_s, "peak_mib": peak_mib, "single_pass": single_pass}


def spawn(kind: str, n: int, args: argparse.Namespace, single_pass: bool = False) -> dict:
    """Run one case in a fresh interpreter and return its measurements."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--worker", kind, str(n), "--repeats", str(args.repeats)]
    cmd += ["--dim", str(args.dim), "--heads", str(args.heads)] + (["--single-pass"] if single_pass else [])
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--kinds", nargs="+", default=list(LINEAR_KINDS), choices=LINEAR_KINDS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--time-limit", type=float, default=300.0, help="skip sdpa cases estimated slower (s)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--single-pass", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        kind, n = args.worker
        print(json.dumps(run_case(kind, int(n), args.repeats, args.dim, args.heads, args.single_pass)))
        return

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, dim {args.dim}, {args.heads} heads,"
        " batch 1, fp32, forward + backward"
    )
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    header = f"{'N':>6} {'kind':>10} {'fwd+bwd s':>10} {'peak MiB':>9} {'speed-up':>9} {'mem ratio':>9}"
    print(header)
    prev: tuple[int, float] | None = None
    for n in sorted(args.sizes):
        est = None if prev is None else prev[1] * (n / prev[0]) ** 2
        if est is not None and est > args.time_limit:
            ref = None
            print(
                f"{n:>6} {'sdpa':>10}  skipped: estimated {est:.0f} s > --time-limit {args.time_limit:.0f} s"
            )
        else:
            ref = spawn("sdpa", n, args, single_pass=est is not None and est > 60)
            prev = (n, ref["time_s"])
            print(
                f"{n:>6} {'sdpa':>10} {ref['time_s']:>10.3f} {ref['peak_mib']:>9.1f} {'1.00':>9} {'1.00':>9}",
                flush=True,
            )
        for kind in args.kinds:
            r = spawn(kind, n, args)
            speed = f"{ref['time_s'] / r['time_s']:.2f}" if ref else "-"
            mem = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref else "-"
            print(
                f"{n:>6} {kind:>10} {r['time_s']:>10.3f} {r['peak_mib']:>9.1f} {speed:>9} {mem:>9}",
                flush=True,
            )
    print("load average at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
