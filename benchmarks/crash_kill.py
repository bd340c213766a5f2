"""Crash safety, measured: kill -9 training and autosave dozens of times, start/stop fine-tuning 50 times, and
fill a real (tmpfs) disk while checkpointing.

1. Training (tiny U-Net on 3 real hippocampus cases, a checkpoint after every step) is SIGKILLed N times: from
   outside after a random delay, or from inside at a random injected moment of a checkpoint write
   (``napari_medssl/testing/crash.py``: complete temporary file not yet renamed, renamed but not committed, half a
   safetensors file, half of ``last.json``). After each kill the last good checkpoint must load (weights,
   optimiser state, best, event log) and the next run must resume at the committed step + 1.
2. The autosave writer (a real hippocampus label map painted a little more at each version) is SIGKILLed N
   times; the crashed autosave must hold the last saved version (or the one being renamed), never a torn file.
3. The viewer's training process is started and stopped 50 times (at once, after a random delay, or after its
   first step): no process, thread or descriptor may be left and memory may grow by less than 50 MB.
4. Disk full for real: a run folder on a small tmpfs filled up (needs root to mount; reported as not run
   otherwise): the write fails with ENOSPC and the previous checkpoint still loads.

    .venv/bin/python benchmarks/crash_kill.py --train-kills 24 --autosave-kills 24 --cycles 50
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from napari_medssl.testing.crash import (  # noqa: E402
    AUTOSAVE_KILL_POINTS,
    KILL_POINTS,
    Child,
    check_run_folder,
    committed_step,
    crashed_autosaves,
    finetune_kwargs,
    first_step,
    painted,
    resources,
    start_stop,
)
from napari_medssl.testing.training import seg_config, small_msd  # noqa: E402

HIPPO = "hippocampus/imagesTr/hippocampus_001.nii.gz"
HIPPO_LABELS = "hippocampus/labelsTr/hippocampus_001.nii.gz"


def train_kills(data: Path, work: Path, n: int, rng: np.random.Generator) -> dict:
    msd = small_msd(data, work / "msd", n=3)
    run = work / "run"
    args = {"data": str(msd), "out": str(run), "max_steps": 10_000}
    step, survived, failures, kinds = 0, 0, [], []
    for i in range(n):
        if i % 2 == 0:
            spec = {"delay": float(rng.uniform(0.0, 3.0))}
        else:
            spec = {
                "kill": {
                    "point": KILL_POINTS[int(rng.integers(0, len(KILL_POINTS)))],
                    "n": int(rng.integers(1, 9)),
                }
            }
        child = Child("train_driver", {**args, "kill": spec.get("kill")})
        if "kill" in spec:
            child.wait(300)
        else:
            child.kill_after_first_line(spec["delay"], timeout=300)
        problems = []
        if child.proc.returncode != -9:
            problems.append(f"exit status {child.proc.returncode}: {child.stderr[-500:]}")
        started = first_step(child.lines)
        if started is not None and started != step + 1:
            problems.append(f"resumed at step {started}, the checkpoint said {step}")
        try:
            new_step = check_run_folder(run)
            if new_step < committed_step(child.lines):
                problems.append(
                    f"last.json says {new_step}, the run had reported {committed_step(child.lines)}"
                )
            step = new_step
        except Exception as err:  # noqa: BLE001 - any failure to load is what this benchmark counts
            problems.append(f"{type(err).__name__}: {err}")
        kind = spec.get("kill", {}).get("point", "external")
        kinds.append(kind)
        if problems:
            failures.append({"kill": i, "spec": spec, "problems": problems})
        else:
            survived += 1
        when = f" after {spec['delay']:.2f} s" if "delay" in spec else f" #{spec['kill']['n']}"
        print(
            f"train kill {i + 1:2d}/{n} ({kind}{when}): committed step {step}, {problems or 'ok'}", flush=True
        )
    final = Child("train_driver", {**args, "max_steps": step + 1})
    code = final.wait(300)
    resumed = first_step(final.lines) == step + 1 and code == 0 and check_run_folder(run) == step + 1
    return {
        "kills": n,
        "survived": survived,
        "failures": failures,
        "last_step": step,
        "final_resume_ok": bool(resumed),
        "points": {k: kinds.count(k) for k in set(kinds)},
    }


def autosave_kills(data: Path, work: Path, n: int, rng: np.random.Generator) -> dict:
    from napari_medssl.autosave import load_autosave
    from napari_medssl.io import read_nifti

    base = read_nifti(data / HIPPO_LABELS).data
    np.save(work / "base.npy", base)
    folder = work / "autosave"
    survived, failures = 0, []
    for i in range(n):
        if i % 2 == 0:
            spec = {"delay": float(rng.uniform(0.0, 0.5))}
        else:
            spec = {
                "kill": {
                    "point": AUTOSAVE_KILL_POINTS[int(rng.integers(0, len(AUTOSAVE_KILL_POINTS)))],
                    "n": int(rng.integers(1, 12)),
                }
            }
        child = Child(
            "autosave_driver",
            {"folder": str(folder), "labels": str(work / "base.npy"), "kill": spec.get("kill")},
        )
        if "kill" in spec:
            child.wait(60)
        else:
            child.kill_after_first_line(spec["delay"], timeout=60)
        saved = int(child.lines[-1]) if child.lines else 0
        mine = [a for a in crashed_autosaves(folder) if a.header["pid"] == child.proc.pid]
        ok = child.proc.returncode == -9 and (len(mine) == 1 if saved else len(mine) <= 1)
        if ok and mine:  # killed during its very first save, a writer has nothing to recover yet
            labels, _ = load_autosave(mine[0].path)
            ok = any(np.array_equal(labels, painted(base, v)) for v in (saved, saved + 1))
        elif ok:
            ok = saved == 0
        survived += ok
        if not ok:
            failures.append({"kill": i, "spec": spec, "saved": saved, "found": len(mine)})
    print(f"autosave: {survived}/{n} kills survived (last saved version recovered)", flush=True)
    return {"kills": n, "survived": survived, "failures": failures}


def start_stop_cycles(data: Path, work: Path, n: int, rng: np.random.Generator) -> dict:
    from napari_medssl.io import read_nifti

    image, labels = read_nifti(data / HIPPO).data, read_nifti(data / HIPPO_LABELS).data
    kwargs = finetune_kwargs(image, labels, work / "ft")
    start_stop(kwargs, "now")  # creates multiprocessing's one resource tracker
    before = resources()
    t0 = time.perf_counter()
    bad, stops, trained = [], [], 0
    for i in range(n):
        mode = "step" if i % 5 == 4 else ("now" if i % 5 in (0, 2) else "delay")
        run_kwargs = {**kwargs, "config": {**kwargs["config"], "out_dir": str(work / f"ft{i}")}}
        r = start_stop(run_kwargs, mode, float(rng.uniform(0.05, 2.0)))
        stops.append(r["stop_s"])
        trained += "step" in r["events"]
        if (
            r["alive"]
            or r["exitcode"] is None
            or r["group"]
            or r["events"][-1:] != ["stopped"]
            or r["errors"]
        ):
            bad.append(r)
    after = resources()
    result = {
        "cycles": n,
        "seconds": time.perf_counter() - t0,
        "trained_before_stop": trained,
        "bad": bad,
        "stop_s_max": max(stops),
        "stop_s_mean": float(np.mean(stops)),
        "rss_growth_mb": after["rss_mb"] - before["rss_mb"],
        "threads": [before["threads"], after["threads"]],
        "fds": [before["fds"], after["fds"]],
        "children_left": after["children"],
    }
    print(
        f"start/stop x{n}: {len(bad)} bad cycles, {trained} stopped mid-training, stop took "
        f"{result['stop_s_mean']:.2f} s mean / {result['stop_s_max']:.2f} s max, RSS growth "
        f"{result['rss_growth_mb']:+.1f} MB, threads {before['threads']}->{after['threads']}, fds "
        f"{before['fds']}->{after['fds']}, children left {after['children']}",
        flush=True,
    )
    return result


def disk_full(data: Path) -> dict:
    """A run folder on a 16 MB tmpfs: train to step 2, fill the disk, continue: ENOSPC, step 2 still loads."""
    from napari_medssl import autosave
    from napari_medssl.engine import train
    from napari_medssl.engine.checkpoint import RunFolder
    from napari_medssl.io import read_nifti

    mount = Path(tempfile.mkdtemp(prefix="medssl-tmpfs-"))
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        mount.rmdir()
        print("disk full: not run (mounting a tmpfs needs root)")
        return {"run": False}
    try:
        msd = small_msd(data, Path(tempfile.mkdtemp()) / "msd", n=3)
        run = mount / "run"
        list(train(seg_config(msd, run, max_steps=2)))
        good = RunFolder(run).read_last()
        labels = read_nifti(data / HIPPO_LABELS).data
        (mount / "autosave").mkdir()
        first = autosave.save_labels(labels, "hippocampus_001", "Labels", folder=mount / "autosave")
        stat = os.statvfs(mount)
        filler = mount / "filler"
        with open(filler, "wb") as fh:  # leave 40 KB: less than one checkpoint
            fh.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 40_000))
        errors = []
        for what, action in (
            ("training", lambda: list(train(seg_config(msd, run, max_steps=4)))),
            (
                "autosave",
                lambda: autosave.save_labels(
                    np.random.default_rng(0).integers(
                        0, 5, (128, 128, 128), dtype=np.uint8
                    ),  # ~0.8 MB zipped
                    "hippocampus_001",
                    "Labels",
                    folder=mount / "autosave",
                ),
            ),
        ):
            try:
                action()
                errors.append(f"{what}: no error")
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    errors.append(f"{what}: {err!r}")
        filler.unlink()
        record = RunFolder(run).read_last()
        check_run_folder(run)
        saved, _ = autosave.load_autosave(first)
        ok = (
            not errors
            and record == good
            and np.array_equal(saved, labels)
            and not [p for p in run.iterdir() if ".tmp" in p.name]
        )
        print(
            f"disk full (16 MB tmpfs): ENOSPC raised, previous checkpoint (step {record['step']}) and autosave "
            f"intact: {'ok' if ok else errors}",
            flush=True,
        )
        return {"run": True, "ok": bool(ok), "errors": errors}
    finally:
        import gc

        gc.collect()  # drop memory-mapped checkpoints before unmounting
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-kills", type=int, default=24)
    p.add_argument("--autosave-kills", type=int, default=24)
    p.add_argument("--cycles", type=int, default=50, help="start/stop cycles of the training process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    data = Path(args.data)
    rng = np.random.default_rng(args.seed)
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="medssl-crash-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if args.train_kills:
            results["train"] = train_kills(data, work, args.train_kills, rng)
        if args.autosave_kills:
            results["autosave"] = autosave_kills(data, work, args.autosave_kills, rng)
        if args.cycles:
            results["start_stop"] = start_stop_cycles(data, work, args.cycles, rng)
        results["disk_full"] = disk_full(data)
        results["seconds"] = time.perf_counter() - t0
    t = results.get("train")
    if t:
        print(
            f"\ntraining: {t['survived']}/{t['kills']} kills survived (kill points {t['points']}), final resume "
            f"{'ok' if t['final_resume_ok'] else 'FAILED'} at step {t['last_step'] + 1}"
        )
    if "autosave" in results:
        print(f"autosave: {results['autosave']['survived']}/{results['autosave']['kills']} kills survived")
    print(f"total {results['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    ok = not t or (t["survived"] == t["kills"] and t["final_resume_ok"])
    ok = ok and ("autosave" not in results or results["autosave"]["survived"] == results["autosave"]["kills"])
    s = results.get("start_stop")
    ok = ok and (not s or (not s["bad"] and s["rss_growth_mb"] < 50 and not s["children_left"]))
    ok = ok and (not results["disk_full"]["run"] or results["disk_full"]["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
