"""Knowledge distillation in the engine: the KL term, a teacher that shapes the student, and bad teachers refused."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from napari_medssl.engine import TrainConfig, train
from napari_medssl.engine.augment import IGNORE
from napari_medssl.engine.loop import distill_loss
from napari_medssl.models import create_model, load_model, read_checkpoint, save_model
from napari_medssl.testing import training as helpers_engine
from napari_medssl.testing.training import TINY_UNET, TINY_VIT, one_thread, small_mias, small_msd  # noqa: F401


@pytest.fixture(scope="module")
def msd(data_dir, tmp_path_factory):
    return small_msd(data_dir, tmp_path_factory.mktemp("msd"), n=5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A 2-level 2D U-Net checkpoint whose outputs are far from anything the labels teach (all but flat)."""
    torch.manual_seed(3)
    model = create_model("unet_tiny", **TINY_UNET)
    with torch.no_grad():
        model.head.weight.mul_(0.01)
        model.head.bias.copy_(torch.tensor([0.0, 0.5, 0.5]))  # leans away from background everywhere
    return str(save_model(model, tmp_path_factory.mktemp("teacher") / "teacher.safetensors"))


def test_distill_loss_is_the_kl_over_labelled_voxels():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    y = torch.randint(0, 3, (2, 5, 7))
    assert distill_loss(s, s, y).item() == pytest.approx(0.0, abs=1e-6)
    want = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), log_target=True, reduction="none")
    assert distill_loss(s, t, y, temperature=2.0).item() == pytest.approx(
        want.sum(1).mean().item() * 4, rel=1e-5
    )
    y[0] = IGNORE  # the first image's voxels leave the average
    only_second = F.kl_div(
        F.log_softmax(s[1:], 1), F.log_softmax(t[1:], 1), log_target=True, reduction="none"
    )
    assert distill_loss(s, t, y).item() == pytest.approx(only_second.sum(1).mean().item(), rel=1e-5)
    s2 = s.clone()
    s2[0] += 5 * torch.randn_like(s2[0])  # what happens at ignored voxels does not count
    assert distill_loss(s2, t, y).item() == pytest.approx(distill_loss(s, t, y).item(), rel=1e-6)
    # classification logits (B, K) with ignored images
    assert distill_loss(s[:, :, 0, 0], t[:, :, 0, 0], torch.tensor([1, IGNORE])).item() > 0


def _kl_to_teacher(student_path: str, teacher_path: str, msd) -> float:
    """Mean KL(teacher ‖ student) on a fixed batch of the cases' middle slices."""
    import nibabel as nib
    import numpy as np

    slices = []
    for path in sorted((msd / "imagesTr").iterdir())[:4]:
        vol = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        mid = vol[vol.shape[0] // 2]
        mid = (mid - mid.min()) / max(float(np.ptp(mid)), 1e-6)
        slices.append(np.pad(mid, [(0, 64 - mid.shape[0]), (0, 48 - mid.shape[1])]))
    x = torch.from_numpy(np.stack(slices))[:, None]
    student, teacher = load_model(student_path).eval(), load_model(teacher_path).eval()
    with torch.no_grad():
        return distill_loss(student(x), teacher(x), torch.zeros(x.shape[0], *x.shape[2:])).item()


def test_a_teacher_pulls_the_student_towards_it_and_is_left_untouched(msd, teacher, tmp_path):
    before = hashlib.sha256(open(teacher, "rb").read()).hexdigest()
    common = dict(max_steps=12, batch_size=4, val_every=12, lr=3e-3, augment=False)
    plain = list(train(helpers_engine.seg_config(msd, tmp_path / "plain", **common)))
    taught = list(
        train(helpers_engine.seg_config(msd, tmp_path / "kd", teacher=teacher, distill_weight=5.0, **common))
    )
    first = [next(e["loss"] for e in run if e["event"] == "step") for run in (plain, taught)]
    assert first[1] > first[0]  # same seed, same batch: the KL term adds to the first loss
    kl_plain = _kl_to_teacher(plain[-1]["last_path"], teacher, msd)
    kl_taught = _kl_to_teacher(taught[-1]["last_path"], teacher, msd)
    assert kl_taught < 0.5 * kl_plain, (kl_taught, kl_plain)
    assert hashlib.sha256(open(teacher, "rb").read()).hexdigest() == before
    state, _, _ = read_checkpoint(taught[-1]["last_path"])
    assert not any("teacher" in k for k in state)  # the student's checkpoint holds the student only
    assert set(state) == set(read_checkpoint(plain[-1]["last_path"])[0])


def test_bad_teachers_are_refused_with_the_reason(msd, tmp_path):
    def run(name: str, spec: str, **kw):
        return next(train(helpers_engine.seg_config(msd, tmp_path / name, teacher=spec, **kw)))

    two_classes = save_model(
        create_model("unet_tiny", num_classes=2, **TINY_UNET), tmp_path / "k2.safetensors"
    )
    with pytest.raises(ValueError, match="teacher .* 2 classes, the student 3"):
        run("a", str(two_classes))
    volumes = save_model(create_model("unet_tiny", spatial_dims=3, **TINY_UNET), tmp_path / "3d.safetensors")
    with pytest.raises(ValueError, match="3 spatial dims, the student 2"):
        run("b", str(volumes))
    classifier = save_model(create_model("vit_tiny", **helpers_engine.TINY_VIT), tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="teacher .* not 'segment'"):
        run("c", str(classifier))
    with pytest.raises(ValueError, match="untrained architecture"):
        run("d", "unet_tiny")
    with pytest.raises(FileNotFoundError):
        run("e", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="pretraining has its own objective"):
        TrainConfig(model="mae_tiny", task="pretrain", teacher=str(two_classes))
    with pytest.raises(ValueError, match="distill_temperature"):
        helpers_engine.seg_config(msd, tmp_path / "f", teacher=str(two_classes), distill_temperature=0)


def test_a_classifier_teacher_must_take_the_students_input_size(data_dir, tmp_path):
    mias = small_mias(data_dir, tmp_path / "mias", n_women=4)
    wide = create_model("vit_tiny", num_classes=2, **{**TINY_VIT, "img_size": 64})
    teacher = save_model(wide, tmp_path / "vit64.safetensors")
    cfg = TrainConfig(
        model="vit_tiny",
        task="classify",
        data=str(mias),
        out_dir=str(tmp_path / "run"),
        max_steps=1,
        batch_size=4,
        val_every=1,
        device="cpu",
        model_overrides=dict(TINY_VIT),
        teacher=str(teacher),
    )
    with pytest.raises(ValueError, match=r"takes inputs of size \(64, 64\), the student \(32, 32\)"):
        next(train(cfg))
    same = save_model(create_model("vit_tiny", num_classes=2, **TINY_VIT), tmp_path / "vit32.safetensors")
    events = list(
        train(TrainConfig(**{**cfg.__dict__, "teacher": str(same), "out_dir": str(tmp_path / "ok")}))
    )
    assert events[-1]["event"] == "done"
