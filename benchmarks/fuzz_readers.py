"""Long fuzzing run of the readers: thousands of mutated real DICOM, NIfTI and PNG files.

Each input is a real file from ../shared/data with one random mutation (see ``napari_medssl/testing/fuzz.py``), read
through the napari reader adapter in a watched worker process (5 s timeout, 4 GiB address-space cap, peak
resident memory per read). Prints counts per seed and outcome, the slowest read and the largest memory peak,
and keeps every failing input (with its mutation and answer as JSON) under ``--keep``.

    .venv/bin/python benchmarks/fuzz_readers.py --inputs 3000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from napari_medssl.testing.fuzz import (  # noqa: E402
    MUTATORS,
    ReaderWorker,
    acceptable,
    huge_claims,
    keep_failure,
    make_input,
    seed_bytes,
)

MAX_PEAK_MB = 256


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=3000, help="mutated inputs to try (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the run (default 0)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before a read counts as a hang")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the real data folder")
    p.add_argument("--keep", default=str(REPO / "test-output" / "fuzz_failures"), help="where failures go")
    p.add_argument("--json", help="write the summary here")
    return p.parse_args()


def check_huge_claims(worker: ReaderWorker, data: Path, folder: Path, failures: list[dict]) -> None:
    """Tiny files claiming huge images must be refused without allocating; failures are appended."""
    for fmt, path in huge_claims(data, folder / "huge").items():
        answer = worker.read(path, trace=True)
        ok = answer["outcome"] == "refused" and answer["traced_peak_mb"] < 1 and answer["peak_mb"] < 8
        claim = "~1.07e9 voxels (under the limit)" if "under" in fmt else "1e12 voxels"
        print(
            f"tiny {fmt} file ({path.stat().st_size} B) claiming {claim}: {answer['outcome']}, "
            f"traced peak {answer['traced_peak_mb']:.3f} MB, RSS peak {answer['peak_mb']:.1f} MB, "
            f"{answer['seconds'] * 1e3:.1f} ms -> {'PASS' if ok else 'FAIL'}"
        )
        if not ok:
            failures.append({"input": str(path), **answer})


def fuzz(
    args: argparse.Namespace, seeds: dict, worker: ReaderWorker, folder: Path, failures: list[dict], t0: float
):
    """Read ``args.inputs`` mutated inputs; count outcomes per seed file and per mutator, track the slowest
    read and the largest memory peak, keep (and append) failures. Returns those four."""
    names = sorted(seeds)
    rng = np.random.default_rng(args.seed)
    counts: dict[str, Counter] = defaultdict(Counter)
    by_mutator: dict[str, Counter] = defaultdict(Counter)
    slowest = (0.0, "")
    biggest = (0.0, "")
    for i in range(args.inputs):
        seed = names[int(rng.integers(0, len(names)))]
        mutator = MUTATORS[int(rng.integers(0, len(MUTATORS)))]
        salt = int(rng.integers(0, 2**32 - 1))
        path, note = make_input(seeds, seed, mutator, salt, folder)
        answer = worker.read(path)
        counts[seed][answer["outcome"]] += 1
        by_mutator[mutator][answer["outcome"]] += 1
        if answer.get("seconds", 0) > slowest[0]:
            slowest = (answer["seconds"], note)
        if answer.get("peak_mb", 0) > biggest[0]:
            biggest = (answer["peak_mb"], note)
        if not acceptable(answer, MAX_PEAK_MB):
            kept = keep_failure(path, answer, note, Path(args.keep))
            failures.append({"input": str(kept), "mutation": note, **answer})
            print(f"FAIL {note}: {answer}", flush=True)
        path.unlink()
        if (i + 1) % 500 == 0:
            print(
                f"... {i + 1} inputs, {len(failures)} failures, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    return counts, by_mutator, slowest, biggest


def report(args, names, elapsed, restarts, counts, by_mutator, slowest, biggest, failures) -> None:
    """Print the outcome tables and extremes; write the JSON summary when ``--json`` is given."""
    outcomes = ("ok", "refused", "bad_output", "unexpected", "crash", "hang")
    print(
        f"\n{args.inputs} mutated inputs in {elapsed:.0f} s ({args.inputs / elapsed:.1f}/s), "
        f"worker restarts {restarts}"
    )
    print(f"{'seed':14s} " + " ".join(f"{o:>10s}" for o in outcomes))
    for name in names:
        print(f"{name:14s} " + " ".join(f"{counts[name][o]:10d}" for o in outcomes))
    print(f"{'mutator':14s} " + " ".join(f"{o:>10s}" for o in outcomes))
    for name in sorted(by_mutator):
        print(f"{name:14s} " + " ".join(f"{by_mutator[name][o]:10d}" for o in outcomes))
    total = Counter()
    for c in counts.values():
        total.update(c)
    memory = sum(1 for f in failures if f.get("outcome") in ("ok", "refused"))
    print(f"total: {dict(total)}; over {MAX_PEAK_MB} MB: {memory}")
    print(f"slowest read {slowest[0] * 1e3:.0f} ms ({slowest[1]})")
    print(f"largest memory peak {biggest[0]:.1f} MB ({biggest[1]})")
    print(f"failures: {len(failures)}" + (f" (kept under {args.keep})" if failures else ""))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "inputs": args.inputs,
                    "seed": args.seed,
                    "seconds": elapsed,
                    "total": dict(total),
                    "per_seed": {k: dict(v) for k, v in counts.items()},
                    "memory_failures": memory,
                    "slowest_ms": slowest[0] * 1e3,
                    "largest_peak_mb": biggest[0],
                    "failures": failures,
                },
                indent=1,
            )
        )


def main() -> int:
    args = parse_args()
    data = Path(args.data)
    seeds = seed_bytes(data)
    worker = ReaderWorker(timeout=args.timeout)
    failures: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medssl-fuzz-") as tmp:
        folder = Path(tmp)
        check_huge_claims(worker, data, folder, failures)
        counts, by_mutator, slowest, biggest = fuzz(args, seeds, worker, folder, failures, t0)
    worker.close()
    elapsed = time.perf_counter() - t0
    report(args, sorted(seeds), elapsed, worker.restarts, counts, by_mutator, slowest, biggest, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
