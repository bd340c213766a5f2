"""scripts/zoo_publish.py's DINO conversion: the teacher ViT of a DINO run, published at another input size
(``--vit-size``), shows the same attention as the DINO's teacher."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from napari_medssl import zoo
from napari_medssl.models import create_model
from napari_medssl.models.layers.pos_embed import resize_pos_embed
from napari_medssl.models.registry import save_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "zoo_publish.py"


@pytest.fixture(scope="module")
def zoo_publish():
    spec = importlib.util.spec_from_file_location("zoo_publish", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dino_run(tmp_path: Path, img_size: int) -> tuple[Path, torch.nn.Module]:
    """A DINO at ``img_size`` whose position table is the 64-px ViT's resized, as
    scripts/dino_continue_init.py makes it when it continues a published model at a higher resolution."""
    torch.manual_seed(0)
    dino = create_model("dino_tiny", img_size=img_size, depth=2, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    table = create_model("vit_tiny", depth=2).pos_embed  # 8 x 8 patches
    grid = resize_pos_embed(table[:, 1:], (8, 8), dino.teacher.base_grid)
    for vit in (dino.student, dino.teacher):
        vit.pos_embed.copy_(torch.cat([table[:, :1], grid], dim=1))
    run = tmp_path / "run"
    run.mkdir()
    save_model(dino, run / "best.safetensors", extra={"task": "pretrain"})
    return run, dino.eval()


@pytest.mark.parametrize("vit_size, expected", [(None, (128, 128)), (64, (64, 64))])
def test_dino_backbone_keeps_the_teachers_attention_at_any_published_size(
    zoo_publish, tmp_path, vit_size, expected
):
    run, dino = _dino_run(tmp_path, img_size=128)
    out = zoo_publish.convert(run, False, True, [], None, vit_size)
    vit = zoo.load(str(out))
    assert vit.spec.input_size == expected
    assert vit.pos_embed.shape[1] == 1 + (expected[0] // 8) * (expected[1] // 8)
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        theirs, ours = dino.cls_attention(x), vit.cls_attention(x)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    # a 64-px table resized to 16 x 16, back to 8 x 8 and again to 16 x 16 at run time: the same maps
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-3)
