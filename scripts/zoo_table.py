"""Print a markdown table of the zoo's models (metrics from their cards) for ``models/README.md``.

Usage: ``python scripts/zoo_table.py`` from the checkout root.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medssl import zoo  # noqa: E402

COLUMNS = {
    "segment": ("mean_iou", "mean_dice", "iou_1", "iou_2", "tta mean_iou"),
    "classify": ("auc", "balanced_accuracy", "accuracy"),
}


def main() -> None:
    cards = [zoo.card(n) for n in zoo.list_zoo()]
    for task, cols in COLUMNS.items():
        rows = [c for c in cards if c.get("task") == task]
        if not rows:
            continue
        print(f"\n### {task}\n")
        print("| model | " + " | ".join(cols) + " | weights MB | reproduce |")
        print("|---" * (len(cols) + 3) + "|")
        for c in rows:
            m = {
                **(c.get("metrics") or {}),
                **{f"tta {k}": v for k, v in (c.get("metrics_tta") or {}).items()},
            }
            vals = " | ".join(f"{m[k]:.3f}" if isinstance(m.get(k), float) else "—" for k in cols)
            mb = c["weights"]["size_bytes"] / 1e6
            print(f"| `{c['name']}` | {vals} | {mb:.1f} | [commands](#{c['name']}) |")
    print("\n## Commands\n")
    for c in cards:
        print(f"### {c['name']}\n\ntrained by:\n\n```bash\n{c['command'].replace(' && ', chr(10))}\n```\n")
        print(f"measured by:\n\n```bash\n{c['metrics_command']}\n```\n")
        if c.get("metrics_tta_command"):
            print(f"with mirroring test-time augmentation:\n\n```bash\n{c['metrics_tta_command']}\n```\n")


if __name__ == "__main__":
    main()
