"""Which slides a job takes: --shard, SLURM array variables (lists only), and list files decoded honestly."""

from __future__ import annotations

import pytest

from nucseg.errors import InputError
from nucseg.wsi.shard import parse_shard, read_slide_list, select, slurm_shard

SLIDES = [f"s{k}.svs" for k in range(10)]


def _env(task, count, first=None, step=None) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count)}
    if first is not None:
        env["SLURM_ARRAY_TASK_MIN"] = str(first)
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("3/16", (3, 16)), (" 2/ 5", (2, 5))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["", "3", "1/0", "4/4", "-1/4", "a/b", "1/2/3", "1.5/4"])
def test_parse_shard_refuses(text):
    with pytest.raises(InputError, match="--shard must be i/n"):
        parse_shard(text)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "3"}, None),  # not an array job as far as we can tell: no count
    (_env(0, 16), (0, 16)),
    (_env(16, 16, first=1), (15, 16)),  # --array=1-16
    (_env(6, 8, first=0, step=2), (3, 8)),  # --array=0-14:2
    (_env(" 7 ", "10"), (7, 10)),
])
def test_slurm_shard(env, expected):
    assert slurm_shard(env) == expected


@pytest.mark.parametrize("env,needle", [
    (_env("abc", 4), "SLURM_ARRAY_TASK_ID='abc' is not an integer"),
    (_env(1, "four"), "SLURM_ARRAY_TASK_COUNT='four' is not an integer"),
    (_env(1, 4, first="x"), "SLURM_ARRAY_TASK_MIN='x' is not an integer"),
    (_env(4, 4), "SLURM_ARRAY_TASK_ID=4 is not one of the 4 tasks"),
    (_env(0, 4, first=1), "SLURM_ARRAY_TASK_ID=0 is not one of the 4 tasks"),
    (_env(3, 4, step=2), "SLURM_ARRAY_TASK_ID=3 is not one of the 4 tasks"),  # --array=0-6:2 has no task 3
    (_env(0, 0), "SLURM_ARRAY_TASK_COUNT=0"),
])
def test_slurm_shard_refuses_bad_variables(env, needle):
    with pytest.raises(InputError) as err:
        slurm_shard(env)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_implicit_shard_applies_to_lists_only():
    env = _env(3, 4)
    # one slide per array task, named on the command line: every task does its own slide
    assert select(["mine.svs"], [], None, env) == (["mine.svs"], None)
    assert select(SLIDES[:3], [], None, env) == (SLIDES[:3], None)
    # a list: every 4th slide, from the 4th
    assert select([], SLIDES, None, env) == (SLIDES[3::4], (3, 4))
    # a list plus command-line slides: the whole set is shared out, so no slide runs in two tasks
    assert select(["extra.svs"], SLIDES, None, env) == ((["extra.svs"] + SLIDES)[3::4], (3, 4))
    # no array: everything
    assert select([], SLIDES, None, {}) == (SLIDES, None)
    # bad variables are only an error when they are used
    assert select(["mine.svs"], [], None, _env("abc", 4)) == (["mine.svs"], None)
    with pytest.raises(InputError, match="SLURM_ARRAY_TASK_ID='abc'"):
        select([], SLIDES, None, _env("abc", 4))


def test_explicit_shard_applies_to_everything_and_wins_over_slurm():
    assert select(["a.svs", "b.svs"], [], "1/2", {}) == (["b.svs"], (1, 2))
    assert select([], SLIDES, "0/3", _env(2, 4)) == (SLIDES[0::3], (0, 3))
    assert select([], SLIDES, "0/3", _env("abc", 4)) == (SLIDES[0::3], (0, 3))


def test_read_slide_list(tmp_path):
    f = tmp_path / "list.txt"
    f.write_bytes("\ufeff/data/é.svs\r\n\n# a comment\n  /data/b.svs  \n".encode("utf-8"))
    assert read_slide_list(f) == ["/data/é.svs", "/data/b.svs"]  # the BOM is not part of the first path
    f.write_bytes(b"/data/a.svs\n/data/caf\xe9.svs\n")  # Latin-1
    with pytest.raises(InputError, match=r"is not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_slide_list(f)
    f.write_text("/data/a.svs\n", encoding="utf-16")  # BOM + NUL bytes
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_slide_list(f)
    f.write_bytes(b"a\x00b\n")
    with pytest.raises(InputError, match="NUL bytes"):
        read_slide_list(f)
    with pytest.raises(InputError, match="input list not found"):
        read_slide_list(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------------ through the CLI
THRESHOLD = ["--segmenter", "threshold", "--tile-size", "128", "--overlap", "24"]


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    from nucseg.wsi.synthslide import make_synthetic_slide

    root = tmp_path_factory.mktemp("shard")
    out = []
    for k in range(2):
        out.append(root / f"s{k}.tif")
        make_synthetic_slide(out[-1], 300, 260, mpp=0.5, nuclei=10, tissue_fraction=1.0, pyramid=False, seed=k)
    return out


def test_one_slide_per_array_task_through_the_cli(two_slides, tmp_path, monkeypatch, capsys):
    """sbatch --array=0-1 ... nucseg predict "${SLIDES[$SLURM_ARRAY_TASK_ID]}" -o ...: each task does its slide."""
    from nucseg_cli.main import main

    for task, slide in enumerate(two_slides):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        out = tmp_path / f"{slide.stem}.geojson"
        rc, err = main(["-q", "predict", str(slide), "-o", str(out), *THRESHOLD]), capsys.readouterr().err
        assert rc == 0, err
        assert out.is_file()


def test_bad_slurm_variables_and_list_files_through_the_cli(two_slides, tmp_path, monkeypatch, capsys):
    from nucseg_cli.main import main

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{s}\n" for s in two_slides), encoding="utf-8-sig")  # with a BOM
    argv = ["-q", "predict", "--input-list", str(listing), "--out-dir", str(tmp_path / "out"), *THRESHOLD]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "abc")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["nucseg: error: SLURM_ARRAY_TASK_ID='abc' is not an integer (or pass --shard i/n)"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    rc, err = main(argv), capsys.readouterr().err
    assert rc == 0, err  # shard 1/2 of the list: the second slide only
    assert sorted(p.name for p in (tmp_path / "out").glob("*.geojson")) == ["s1.geojson"]
    listing.write_bytes(f"{two_slides[0]}\n".encode() + b"/data/caf\xe9.svs\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"nucseg: error: input list {listing} is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"]
