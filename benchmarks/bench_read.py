"""Reading real DICOM series: the plugin's reader vs a plain pydicom ``dcmread`` + ``pixel_array`` loop.

Both read the same files in the same run, interleaved (plain, plugin, plain, plugin, ...) after one
warm-up of each, so the OS file cache and CPU load are shared; the median of each is reported and
the ratio plugin / plain printed (goal ≤ 1.2x), for CPU time of this process (robust on a shared
machine) and wall-clock time. The plugin does more than the loop (grouping into
series, sorting along the slice normal, stacking, rescale, label detection, window presets), all of
which must fit in that 20 %.

Usage::

    MEDSSL_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_read.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import pydicom

from napari_medssl._reader import read_layers


def series_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` that directly holds files (one DICOM series each in ../shared/data)."""
    return sorted({p.parent for p in root.rglob("*") if p.is_file()})


def plain_loop(folder: Path) -> int:
    """What a user would write with pydicom alone: read every file and decode its pixels."""
    n = 0
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        n += ds.pixel_array.size
    return n


def plugin_read(folder: Path) -> int:
    """The napari reader: series grouping, sorting, rescale, labels, windows, LayerData tuples."""
    return sum(layer[0].size for layer in read_layers(str(folder)))


def timed(fn, folder: Path) -> tuple[float, float]:
    """``(cpu_s, wall_s)`` of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(folder)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("MEDSSL_DATA_DIR", "../shared/data"))
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    folders = series_folders(args.data / "dicom")
    print(f"pydicom {pydicom.__version__}; {args.repeats} interleaved repeats per series; medians in ms")
    print(
        f"{'series':44s} {'files':>5s} | {'CPU plain':>9s} {'plugin':>7s} {'ratio':>5s} | {'wall plain':>10s} {'plugin':>7s} {'ratio':>5s}"
    )
    totals = [0.0, 0.0, 0.0, 0.0]
    for folder in folders:
        assert plain_loop(folder) == plugin_read(folder), f"{folder}: the two reads disagree on voxel count"
        plain, plugin = [], []
        for _ in range(args.repeats):
            plain.append(timed(plain_loop, folder))
            plugin.append(timed(plugin_read, folder))
        pc, pw = (statistics.median(t[i] for t in plain) for i in (0, 1))
        qc, qw = (statistics.median(t[i] for t in plugin) for i in (0, 1))
        for i, v in enumerate((pc, qc, pw, qw)):
            totals[i] += v
        name = str(folder.relative_to(args.data / "dicom"))
        name = name if len(name) <= 44 else "…" + name[-43:]
        n_files = sum(1 for f in folder.iterdir() if f.is_file())
        print(
            f"{name:44s} {n_files:5d} | {pc * 1e3:9.1f} {qc * 1e3:7.1f} {qc / pc:5.2f} | "
            f"{pw * 1e3:10.1f} {qw * 1e3:7.1f} {qw / pw:5.2f}"
        )
    pc, qc, pw, qw = totals
    print(
        f"{'all series':44s} {'':5s} | {pc * 1e3:9.1f} {qc * 1e3:7.1f} {qc / pc:5.2f} | "
        f"{pw * 1e3:10.1f} {qw * 1e3:7.1f} {qw / pw:5.2f}"
    )


if __name__ == "__main__":
    main()
