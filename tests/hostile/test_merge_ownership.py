"""merge and train --merge never overwrite their own inputs, even a merged model nucseg wrote, and never write
inside the adapter folder (issue 24, classes 2 and 19)."""

from __future__ import annotations

import pytest

from nucseg_cli.main import main
from hostile_helpers import one_error, tiny_adapter


@pytest.fixture(scope="module")
def merged_base(tmp_path_factory):
    """M.safetensors, a model nucseg merged (tagged nucseg-merged), and an adapter trained on top of it."""
    from nucseg.model.adapter import export_merged
    from nucseg.model.sam import load_sam

    root = tmp_path_factory.mktemp("m")
    model, _ = load_sam("vit_tiny", None, img_size=64, seed=0)
    m = export_merged(model, root / "M.safetensors")
    return m, tiny_adapter(root / "adapter", checkpoint=m)


def test_merge_onto_its_own_checkpoint_is_refused(merged_base, capsys):
    m, adapter = merged_base
    before = m.read_bytes()
    rc = main(["-q", "merge", "--adapter", str(adapter), "--checkpoint", str(m), "-o", str(m)])
    one_error(rc, capsys.readouterr().err, 6, str(m))
    assert m.read_bytes() == before


def test_merge_into_the_adapter_folder_is_refused(merged_base, capsys):
    m, adapter = merged_base
    out = adapter / "merged.safetensors"
    rc = main(["-q", "merge", "--adapter", str(adapter), "--checkpoint", str(m), "-o", str(out)])
    one_error(rc, capsys.readouterr().err, 6, "input")
    assert not out.exists()


def test_train_merge_onto_its_checkpoint_is_refused_before_training(merged_base, tmp_path, capsys):
    from nucseg.learn.demo import make_demo_dataset

    m, _ = merged_base
    data = make_demo_dataset(tmp_path / "data", tiles_per_organ=1, size=64)
    before = m.read_bytes()
    rc = main(["-q", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "vit_tiny",
               "--checkpoint", str(m), "--merge", str(m), "--epochs", "1", "--device", "cpu"])
    one_error(rc, capsys.readouterr().err, 6, str(m))
    assert m.read_bytes() == before and not (tmp_path / "run" / "adapter").exists()


def test_merge_to_a_new_path_still_works(merged_base, tmp_path, capsys):
    m, adapter = merged_base
    out = tmp_path / "merged.safetensors"
    assert main(["-q", "merge", "--adapter", str(adapter), "--checkpoint", str(m), "-o", str(out)]) == 0
    assert out.is_file() and out.read_bytes() != m.read_bytes()
