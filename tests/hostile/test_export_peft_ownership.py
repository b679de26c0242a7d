"""export-peft replaces only a folder nucseg's own export wrote, and never writes into or over its input
(issue 24, classes 1 and 19)."""

from __future__ import annotations

import json

import pytest

from nucseg_cli.main import main
from hostile_helpers import one_error, tiny_adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return tiny_adapter(tmp_path_factory.mktemp("ad") / "adapter")


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_tools_peft_folder_is_refused_untouched(adapter, tmp_path, capsys):
    """adapter_config.json is every PEFT adapter's file: it does not make the folder nucseg's."""
    other = tmp_path / "their_peft"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (other / "adapter_model.safetensors").write_bytes(b"their weights")
    (other / "NOTES.md").write_text("months of work")
    before = _tree(other)
    rc = main(["-q", "export-peft", str(adapter), str(other)])
    one_error(rc, capsys.readouterr().err, 6, str(other))
    assert _tree(other) == before


def test_export_over_a_folder_holding_the_source_adapter_is_refused(tmp_path, capsys):
    """`export-peft F/adapter F`: F (another PEFT folder) holds the adapter being exported."""
    folder = tmp_path / "F"
    source = tiny_adapter(folder / "adapter")
    (folder / "adapter_config.json").write_text("{}")
    before = _tree(folder)
    rc = main(["-q", "export-peft", str(source), str(folder)])
    one_error(rc, capsys.readouterr().err, 6, str(folder))
    assert _tree(folder) == before


def test_export_inside_its_own_adapter_is_refused(adapter, capsys):
    """`export-peft ad ad/peft`: an output inside an input (class 19)."""
    before = _tree(adapter)
    rc = main(["-q", "export-peft", str(adapter), str(adapter / "peft")])
    one_error(rc, capsys.readouterr().err, 6, "input")
    assert _tree(adapter) == before and not (adapter / "peft").exists()


def test_a_previous_export_of_nucseg_is_replaced(adapter, tmp_path, capsys):
    out = tmp_path / "peft"
    assert main(["-q", "export-peft", str(adapter), str(out)]) == 0
    (out / "adapter_model.safetensors").write_bytes(b"stale")
    assert main(["-q", "export-peft", str(adapter), str(out)]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != b"stale"
    assert json.loads((out / "nucseg_export.json").read_text())["nucseg_file"] == "peft-export"
