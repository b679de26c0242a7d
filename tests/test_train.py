"""Training on real tiles: the loss falls, resume equals an uninterrupted run, the base stays untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucseg.model.adapter import load_adapter
from nucseg.learn.data import Tile
from nucseg.errors import CheckpointError
from nucseg.model.lora import MethodConfig, apply_method
from nucseg.model.sam import load_sam
from nucseg.learn.train import Trainer, TrainConfig, finetune, sample_prompts
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

FAST = dict(batch_size=2, positive_prompts=6, negative_prompts=2, device="cpu")


def _small(tiles: list[Tile], size: int = 256) -> list[Tile]:
    """Top-left crops keep these tests quick on 2 CPU cores (the encoder cost is quadratic in size)."""
    return [Tile(t.name, t.organ, t.image[:size, :size].copy(), t.labels[:size, :size].copy(), None) for t in tiles]


def test_prompts_land_on_their_nuclei_and_background():
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 64), np.int32)
    labels[5:15, 5:15] = 3
    labels[40:50, 30:45] = 7
    amb = np.zeros_like(labels, bool)
    amb[:, 55:] = True
    pts, tgt = sample_prompts(labels, amb, rng, n_pos=20, n_neg=30)
    assert len(pts) == 50 and set(tgt[:20]) <= {3, 7} and (tgt[20:] == 0).all()
    xy = np.floor(pts).astype(int)
    assert (labels[xy[:, 1], xy[:, 0]] == tgt).all()  # each point lies inside its target (or background)
    assert not amb[xy[20:, 1], xy[20:, 0]].any()  # negatives avoid ambiguous areas
    pts, tgt = sample_prompts(np.zeros((32, 32), np.int32), None, rng, 4, 2)
    assert len(pts) == 6 and (tgt == 0).all()  # an empty tile still trains the "no nucleus" answer


def test_short_training_lowers_the_loss_on_real_tiles(real_tiles, tmp_path):
    tiles = _small(real_tiles[:4])
    model, _ = load_sam("vit_tiny", seed=0)
    torch.manual_seed(0)
    apply_method(model, MethodConfig())
    trainer = Trainer(model, tiles, TrainConfig(epochs=6, lr=2e-3, **FAST), tmp_path)
    with torch.no_grad():
        before = trainer.losses(tiles, np.random.default_rng(99))["loss"].item()
    history = trainer.fit({"run": "t"})
    with torch.no_grad():
        after = trainer.losses(tiles, np.random.default_rng(99))["loss"].item()
    assert after < 0.8 * before, (before, after, [h.loss for h in history])
    assert (tmp_path / "checkpoint.safetensors").is_file() and (tmp_path / "curves.png").stat().st_size > 1000


@pytest.fixture
def one_thread():
    """Bitwise comparisons need one intra-op thread: with two, CPU kernels split reductions differently from run
    to run (two uninterrupted runs in one process differ by ~1e-6 in the LoRA weights), which would hide what
    the test checks: that resuming changes nothing (tests/test_kill_resume.py runs with one thread too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resume_continues_exactly_and_base_is_unchanged(real_tiles, tmp_path, tiny_official_ckpt, one_thread):
    tiles = _small(real_tiles[:2], 128)
    before = tiny_official_ckpt.read_bytes()
    cfg = TrainConfig(epochs=2, **FAST)
    straight = finetune(tiles, tmp_path / "a", "vit_tiny", tiny_official_ckpt, MethodConfig(), cfg, resume=False)
    # an interrupted run: one epoch, then the same command again with resume
    finetune(tiles, tmp_path / "b", "vit_tiny", tiny_official_ckpt, MethodConfig(),
             TrainConfig(epochs=2, **FAST), resume=False, on_step=_stop_after_first_epoch)
    resumed = finetune(tiles, tmp_path / "b", "vit_tiny", tiny_official_ckpt, MethodConfig(), cfg, resume=True)
    a, b = load_file(str(straight.adapter / "adapter.safetensors")), load_file(str(resumed.adapter / "adapter.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert [h.loss for h in straight.history] == [h.loss for h in resumed.history]
    # the base checkpoint file is never written, and the frozen encoder weights equal the file's
    assert tiny_official_ckpt.read_bytes() == before
    adapted, _ = load_adapter(straight.adapter, tiny_official_ckpt)
    base, _ = load_sam("vit_tiny", tiny_official_ckpt, img_size=128)
    for name, value in base.state_dict().items():
        if name.startswith("image_encoder."):
            torch.testing.assert_close(adapted.state_dict()[name], value, atol=0, rtol=0)
    # a checkpoint from a different run is refused rather than silently mixed in
    with pytest.raises(CheckpointError, match="different run"):
        finetune(tiles, tmp_path / "b", "vit_tiny", tiny_official_ckpt, MethodConfig(rank=2), cfg, resume=True)


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(epoch: int, step: int, steps: int, loss: float) -> None:
    if epoch == 1:
        raise _Interrupt


@pytest.fixture(autouse=True)
def _swallow_interrupt(monkeypatch):
    """finetune's first call above is 'killed' at the start of epoch 2 (after epoch 1 was checkpointed)."""
    import nucseg.learn.train as train_mod

    real = train_mod.Trainer.fit

    def fit(self, fingerprint, on_step=None):
        try:
            return real(self, fingerprint, on_step)
        except _Interrupt:
            return self.history

    monkeypatch.setattr(train_mod.Trainer, "fit", fit)


def test_boxes_and_balanced_ce_reach_the_loss(real_tiles, tmp_path):
    """Same batch and prompts (drawn before the box coin flips): boxes change the decoder's answer, and
    class-balanced CE changes the mask loss; neither breaks the loss."""
    tiles = _small(real_tiles[:1], 128)
    model, _ = load_sam("vit_tiny", img_size=128, seed=0)
    apply_method(model, MethodConfig())
    trainer = Trainer(model, tiles, TrainConfig(epochs=1, **FAST), tmp_path)
    with torch.no_grad():
        plain = trainer.losses(tiles, np.random.default_rng(5))
        trainer.cfg.box_fraction = 1.0
        boxed = trainer.losses(tiles, np.random.default_rng(5))
        trainer.cfg.box_fraction, trainer.cfg.balance_ce = 0.0, True
        balanced = trainer.losses(tiles, np.random.default_rng(5))
    assert torch.isfinite(boxed["loss"]) and torch.isfinite(balanced["loss"])
    assert boxed["mask_loss"] != plain["mask_loss"]
    assert balanced["mask_loss"] != plain["mask_loss"] and balanced["iou_loss"] == plain["iou_loss"]
