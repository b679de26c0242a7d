"""The learned prompt modes (nucseg.model.heads): targets, centre prompts, watershed, training, adapter storage,
calibration and mode defaults, and whole slides (seams, cache, resume) with prompts centers / none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nucseg.errors import InputError
from nucseg.learn.calibrate import MODE_FIELDS, choose_mode, resolve_infer
from nucseg.model.heads import (CELL, attach_prompt_heads, center_cell_targets, center_points, instance_targets,
                                negative_points, watershed_instances)
from nucseg.model.infer import InferConfig, SamTileSegmenter
from nucseg.model.sam import build_sam

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

SIZE = 128  # tile side of the tiny trained adapter


# ------------------------------------------------------------------------------------------------ units
def test_instance_targets_centres_inside_and_touching_nuclei_separated():
    lab = np.zeros((48, 48), np.int32)
    lab[4:20, 4:20] = 1
    lab[4:20, 20:44] = 2  # touches nucleus 1
    yy, xx = np.indices(lab.shape)
    lab[((yy - 34) ** 2 + (xx - 14) ** 2) < 64] = 3
    t = instance_targets(lab)
    assert t.centers.shape == (3, 2)
    for k, (x, y) in enumerate(t.centers, start=1):
        assert lab[int(y), int(x)] == k  # every centre lies on its own nucleus
    assert np.allclose(t.centers[2], (14.5, 34.5), atol=1.01)
    for k in (1, 2, 3):  # normalised per nucleus: the boundary map reaches 1 inside each
        assert t.boundary_dist[lab == k].max() == pytest.approx(1.0)
        assert t.center_dist[lab == k].max() == pytest.approx(1.0)
    # the shared edge of 1 and 2 is a boundary of both (lowest boundary distance there)
    assert t.boundary_dist[10, 19] == t.boundary_dist[10, 20] == t.boundary_dist[lab > 0].min()
    assert (t.boundary_dist[lab == 0] == 0).all() and (t.center_dist[lab == 0] == 1).all()
    assert instance_targets(np.zeros((8, 8), int)).centers.shape == (0, 2)


def test_cell_targets_and_centre_decoding_round_trip():
    centers = [np.array([[20.0, 40.0], [100.5, 9.25]], np.float32), np.zeros((0, 2), np.float32)]
    obj, off = center_cell_targets(centers, 2, 8, "cpu")
    assert obj.sum() == 2 and obj[0, 2, 1] == 1 and obj[0, 0, 6] == 1
    # a head output that says exactly that decodes to the same points
    out = torch.full((2, 3, 8, 8), -20.0)
    out[:, 0] = torch.where(obj > 0, 20.0, -20.0)
    out[:, 1:] = off
    pts, index, prob = center_points(out, 0.5, 6)
    assert index.tolist() == [0, 0]
    assert sorted(map(tuple, pts.tolist())) == sorted(map(tuple, centers[0].tolist()))
    assert (prob > 0.99).all()


def test_point_nms_keeps_the_more_probable_and_negatives_are_nearest_of_the_tile():
    out = torch.full((2, 3, 4, 4), -20.0)
    out[:, 1:] = 0.0
    out[0, 0, 1, 1], out[0, 1, 1, 1] = 3.0, 0.45  # x = (1.95) * 16 = 31.2
    out[0, 0, 1, 2], out[0, 1, 1, 2] = 1.0, -0.45  # x = (2.05) * 16 = 32.8: 1.6 px away -> suppressed
    out[0, 0, 3, 3] = 2.0
    out[1, 0, 0, 0] = 2.0
    pts, index, prob = center_points(out, 0.5, 6)
    assert index.tolist() == [0, 0, 1]
    assert torch.allclose(pts[0], torch.tensor([31.2, 24.0])) and prob[0] > prob[1]
    coords, labels = negative_points(pts, index, 2)
    assert coords.shape == (3, 3, 2) and labels.tolist() == [[1, 0, -1], [1, 0, -1], [1, -1, -1]]
    assert torch.equal(coords[0, 1], pts[1]) and torch.equal(coords[1, 1], pts[0])
    assert center_points(out, 0.5, 6, valid=(40, 40))[1].tolist() == [0, 1]  # (56, 56) is padding


def test_watershed_is_batched_per_tile_and_splits_touching_nuclei():
    h = w = 40
    lab = np.zeros((h, w), np.int32)
    yy, xx = np.indices((h, w))
    lab[((yy - 12) ** 2 + (xx - 12) ** 2) < 64] = 1
    lab[((yy - 12) ** 2 + (xx - 26) ** 2) < 64] = 2  # touching: one connected foreground blob
    lab[((yy - 30) ** 2 + (xx - 30) ** 2) < 16] = 3  # 49 px
    t = instance_targets(lab)
    maps = np.stack([np.stack([(lab > 0).astype(np.float32), t.center_dist, t.boundary_dist])] * 2)
    maps[1] = maps[1][:, ::-1].copy()  # the second tile: rows flipped
    labels, scores = watershed_instances(maps, 0.5, 0.5, 0.3, min_area=0)
    assert labels.dtype == np.int32 and labels.shape == (2, h, w)
    assert [int(m) for m in labels.max(axis=(1, 2))] == [3, 3] and [len(s) for s in scores] == [3, 3]
    from nucseg.wsi.synthslide import match_instances

    _, _, iou = match_instances(lab, labels[0])
    assert (iou > 0.9).sum() == 3
    one, _ = watershed_instances(maps[1:], 0.5, 0.5, 0.3, min_area=0)
    assert np.array_equal(one[0], labels[1])  # the same result alone as in a batch
    small, sc = watershed_instances(maps, 0.5, 0.5, 0.3, min_area=60)
    assert small.max() == 2 and len(sc[0]) == 2  # nucleus 3 (49 px) dropped, ids stay 1..n
    empty, sc = watershed_instances(np.zeros_like(maps), 0.5, 0.5, 0.3, 0)
    assert empty.max() == 0 and [len(s) for s in sc] == [0, 0]


def test_multi_point_fast_decode_equals_the_reference_decoder():
    from nucseg.model.fastdecode import decode_points, prepare
    from nucseg.model.sam import decode, encode

    torch.manual_seed(0)
    model = build_sam("vit_tiny", img_size=64).eval()
    with torch.no_grad():
        emb = encode(model, torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8))
        pts = torch.rand(5, 3, 2) * 64
        labels = torch.tensor([[1, 0, 0], [1, 0, -1], [1, -1, -1], [1, 0, 0], [1, 0, -1]])
        index = torch.tensor([1, 0, 1, 0, 0])
        fast, fiou = decode_points(model, prepare(model, emb), pts, index, labels=labels)
        ref, riou = decode(model, emb, pts, labels, index)
    assert torch.allclose(fast, ref, atol=1e-4) and torch.allclose(fiou, riou, atol=1e-5)


def test_learned_modes_need_their_heads_and_run_on_a_batch():
    torch.manual_seed(0)
    model = build_sam("vit_tiny", img_size=64)
    with pytest.raises(InputError, match="centers needs an adapter"):
        SamTileSegmenter(model, InferConfig(prompts="centers"))
    with pytest.raises(InputError, match="negative-prompts"):
        InferConfig(negative_prompts=-1).validate()
    attach_prompt_heads(model)
    tiles = np.random.default_rng(0).integers(0, 255, (3, 64, 48, 3), dtype=np.uint8)
    for mode in ("centers", "none"):
        seg = SamTileSegmenter(model, InferConfig(prompts=mode, center_threshold=0.0, pred_iou_thresh=-9,
                                                  stability_thresh=0, ais_foreground=0.0, negative_prompts=1))
        seg.profile = True
        res = seg(tiles)
        assert res.labels.shape == (3, 64, 48)
        assert [len(s) for s in res.scores] == [int(m) for m in res.labels.max(axis=(1, 2))]
        assert seg.timings["encoder"] > 0 and seg.timings["heads"] > 0
        if mode == "centers":  # every in-tile cell above 0 (12 of 16 cells of a 64 x 48 tile, after NMS)
            assert seg.stats["prompts_decoded"] == 3 * 12 and seg.stats["decoder_calls"] >= 1
        else:
            assert seg.stats["prompts_decoded"] == 0 and seg.stats["decoder_calls"] == 0


def test_mode_choice_best_calibrated_then_override():
    def t(score):
        return {"metric": "pq", "score": score, "tiles": 3}

    per_mode = {"auto": t(0.30), "centers": t(0.41), "none": t(0.38)}
    modes = ["auto", "grid", "centers", "none"]
    mode, why = choose_mode(None, per_mode, modes)
    assert mode == "centers" and "auto 0.300, centers 0.410, none 0.380" in why and "3 held-back" in why
    assert choose_mode("grid", per_mode, modes) == ("grid", "--prompts")
    assert choose_mode(None, {"auto": t(0.3), "centers": t(0.3)}, modes)[0] == "auto"  # a tie keeps auto
    assert choose_mode(None, {"auto": t(0.3)}, ["auto", "grid"])[0] == "auto"
    assert choose_mode(None, None)[0] == "auto"  # a base: no heads
    cfg, used = resolve_infer({}, {**t(0.3), "pred_iou_thresh": 0.1},
                              {"centers": {**t(0.41), "center_threshold": 0.3, "pred_iou_thresh": 0.2}}, modes)
    assert cfg.prompts == "centers" and cfg.center_threshold == 0.3 and cfg.pred_iou_thresh == 0.2
    assert set(used) == set(MODE_FIELDS["centers"]) and used["center_threshold"]["source"] == "adapter"


# ---------------------------------------------------------------------------------- a tiny trained adapter
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two vit_tiny LoRA runs on 128 px demo tiles, with and without the prompt heads (same seed)."""
    from nucseg.learn.data import load_dataset
    from nucseg.learn.demo import make_demo_dataset
    from nucseg.learn.train import TrainConfig, finetune
    from nucseg.model.lora import MethodConfig

    root = tmp_path_factory.mktemp("heads")
    data = make_demo_dataset(root / "data", tiles_per_organ=3, size=SIZE, seed=1)
    tiles = load_dataset(data, tile_size=SIZE)
    cfg = TrainConfig(epochs=3, batch_size=3, lr=2e-3, calibration_fraction=0.34, device="cpu", seed=3)
    method = MethodConfig(method="lora", rank=2)
    infer = InferConfig(points_per_side=8)
    from dataclasses import replace

    # one thread: with two, CPU training is not bitwise reproducible even between two identical runs (checked),
    # and the test compares the two runs' tensors exactly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with_heads = finetune(tiles, root / "heads", "vit_tiny", None, method, cfg, infer=infer)
        without = finetune(tiles, root / "plain", "vit_tiny", None, method, replace(cfg, prompt_heads=False),
                           infer=infer)
    finally:
        torch.set_num_threads(threads)
    return root, with_heads, without, tiles


def test_heads_are_stored_calibrated_and_leave_mask_training_unchanged(trained):
    from nucseg.model.adapter import load_adapter, read_adapter

    _, res, plain, _ = trained
    tensors, base = load_file(str(res.adapter / "adapter.safetensors")), load_file(str(plain.adapter / "adapter.safetensors"))
    assert any(k.startswith("center_head.") for k in tensors) and any(k.startswith("instance_head.") for k in tensors)
    assert not any(k.startswith(("center_head.", "instance_head.")) for k in base)
    # the heads learn from the embedding without shaping it: every other tensor is exactly as without them
    assert set(base) <= set(tensors) and all(torch.equal(base[k], tensors[k]) for k in base)
    assert res.history[-1].head_loss < res.history[0].head_loss  # the heads learn
    info = read_adapter(res.adapter)
    assert info.modes == ["auto", "grid", "centers", "none"]
    assert set(info.mode_thresholds) == {"auto", "centers", "none"}
    for mode in ("centers", "none"):
        t = info.mode_thresholds[mode]
        assert set(MODE_FIELDS[mode]) <= set(t) and 0 <= t["score"] <= 1 and t["metric"] == "pq"
    model, _ = load_adapter(res.adapter)
    assert model.center_head is not None and model.instance_head is not None
    old = read_adapter(plain.adapter)  # an adapter without heads: as before
    assert old.modes == ["auto", "grid"] and set(old.mode_thresholds) == {"auto"}
    plain_model, _ = load_adapter(plain.adapter)
    assert getattr(plain_model, "center_head", None) is None


def test_spec_defaults_to_the_best_calibrated_mode_and_prompts_overrides(trained):
    from nucseg.model.adapter import read_adapter
    from nucseg.segmenter import SegmenterSpec

    _, res, plain, tiles = trained
    info = read_adapter(res.adapter)
    scores = {m: t["score"] for m, t in info.mode_thresholds.items()}
    best = max(["auto", "centers", "none"], key=lambda m: (scores[m], m == "auto"))
    spec = SegmenterSpec.sam(res.adapter, device="cpu", infer={"points_per_side": 8})
    mode, why = spec.prompt_mode()
    assert mode == best and "best calibrated" in why
    seg = spec.build()
    assert seg.cfg.prompts == best and seg.prompt_mode == (mode, why)
    assert set(spec.thresholds_used()) == set(MODE_FIELDS[best])
    for m in ("centers", "none", "grid"):
        forced = SegmenterSpec.sam(res.adapter, device="cpu", infer={"points_per_side": 8, "prompts": m}).build()
        assert forced.cfg.prompts == m
        out = forced(np.stack([t.image for t in tiles[:2]]))
        assert out.labels.shape == (2, SIZE, SIZE)
    assert SegmenterSpec.sam(plain.adapter, device="cpu").prompt_mode()[0] == "auto"
    with pytest.raises(InputError, match="needs an adapter"):
        SegmenterSpec.sam(plain.adapter, device="cpu", infer={"prompts": "none"}).build()


def test_cli_says_which_mode_and_refuses_a_mode_without_its_head(trained, tmp_path, capsys):
    from nucseg_cli.main import main

    root, res, plain, _ = trained
    images = next((root / "data").iterdir()) / "tissue images"
    capsys.readouterr()
    assert main(["-q", "segment", str(images), "--adapter", str(res.adapter), "-o", str(tmp_path / "a"),
                 "--points-per-side", "8"]) == 0
    err = capsys.readouterr().err
    assert "prompts: " in err and "best calibrated mode" in err
    assert main(["-q", "segment", str(images), "--adapter", str(res.adapter), "-o", str(tmp_path / "b"),
                 "--prompts", "none", "--min-area", "3"]) == 0
    err = capsys.readouterr().err
    assert "prompts: none (--prompts)" in err and "ais_foreground" in err and "min_area 3 (command line)" in err
    assert main(["-q", "segment", str(images), "--adapter", str(plain.adapter), "-o", str(tmp_path / "c"),
                 "--prompts", "centers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nucseg: error: --prompts centers needs an adapter") and not (tmp_path / "c").exists()


# -------------------------------------------------------------------------------------------- whole slides
def _slide(tmp_path, overlap):
    from nucseg.wsi.synthslide import make_synthetic_slide

    stride = SIZE - overlap
    w, h = SIZE + 3 * stride, SIZE + 2 * stride  # the grid fits the slide exactly: no padded tiles
    path = tmp_path / "s.tif"
    make_synthetic_slide(path, w, h, mpp=0.5, nuclei=60, tissue_fraction=1.0, seed=5, diameter=(6.0, 14.0))
    return path, w, h


class _EmbeddingCentres(torch.nn.Module):
    """A stand-in centre head (a model trained for seconds proposes nothing): centres where embedding channel 0
    is above its tile's mean, offsets from channels 1-2, so what each tile proposes depends on its content."""

    def forward(self, emb):
        obj = 8 * (emb[:, :1] - emb[:, :1].mean((2, 3), keepdim=True)) / emb[:, :1].std().clamp(min=1e-6)
        return torch.cat([obj, 0.4 * torch.tanh(emb[:, 1:3])], 1)


class _DarkNuclei(torch.nn.Module):
    """A stand-in instance head: foreground where the image is dark (the synthetic slide's nuclei), distance
    maps from its blurred darkness (high inside a nucleus, low at its rim)."""

    def forward(self, emb, images):
        dark = 1 - F.avg_pool2d(images.float().mean(1, keepdim=True) / 255, 4)  # (B, 1, S/4, S/4)
        fg = (dark > 0.45).float()
        inner = F.avg_pool2d(fg, 3, stride=1, padding=1) * fg
        return torch.cat([12 * (fg - 0.5), 12 * (0.5 - inner), 12 * (inner - 0.5)], 1)


def _disc_decoder(model, ctx, points, index, multimask=False, labels=None):
    """A stand-in for SAM's decoder (tested on its own in test_fastdecode / above): a disc of radius 7 px around
    each positive point, at the decoder's 1/4 resolution, predicted IoU 1."""
    low = ctx.hw[0] * 4
    pts = points[:, 0] if points.ndim == 3 else points
    yy, xx = torch.meshgrid(torch.arange(low) * 4 + 2.0, torch.arange(low) * 4 + 2.0, indexing="ij")
    d = ((xx[None] - pts[:, 0, None, None]) ** 2 + (yy[None] - pts[:, 1, None, None]) ** 2).sqrt()
    return (7.0 - d)[:, None], torch.ones(len(pts), 1)


@pytest.fixture
def stand_ins(trained, monkeypatch):
    """The trained adapter's segmenter for a mode, with stand-in heads (and decoder) that do propose nuclei."""
    import nucseg.model.infer as infer
    from nucseg.segmenter import SegmenterSpec

    monkeypatch.setattr(infer, "decode_points", _disc_decoder)
    _, res, _, _ = trained

    def build(mode, **extra):
        seg = SegmenterSpec.sam(res.adapter, device="cpu", infer={"points_per_side": 8, "prompts": mode,
                                                                  "min_area": 4, **extra}).build()
        seg.model.center_head, seg.model.instance_head = _EmbeddingCentres(), _DarkNuclei()
        return seg

    return build


@pytest.mark.parametrize("mode", ["centers", "none"])
def test_whole_slide_is_seam_correct_and_resumes(stand_ins, tmp_path, mode):
    """Each mode through predict_slide equals the ownership rule applied to its own per-tile predictions
    (as tests/test_stitch.py proves for the classical segmenter), and its cache resumes per mode."""
    import openslide
    import zarr

    from nucseg.segmenter import SegmenterSpec
    from nucseg.wsi.predict import PredictConfig, predict_slide
    from nucseg.wsi.stitch import keep_mask
    from nucseg.wsi.synthslide import match_instances
    from nucseg.wsi.tiling import TileGrid

    overlap = 32
    path, w, h = _slide(tmp_path, overlap)
    seg = stand_ins(mode, pred_iou_thresh=0.5, stability_thresh=0.5)
    cfg = PredictConfig(overlap=overlap, batch_size=12, tissue_mask=False, labels=tmp_path / "l.zarr",
                        work_dir=tmp_path / "work", target_mpp=0.5)
    summary = predict_slide(path, tmp_path / "a.geojson", seg, cfg)
    labels = np.asarray(zarr.open_group(str(tmp_path / "l.zarr"), mode="r")["labels/nuclei/0"][:])
    # the reference: the same tiles through the same segmenter, the ownership rule by hand
    rgb = np.asarray(openslide.OpenSlide(str(path)).read_region((0, 0), 0, (w, h)).convert("RGB"))
    grid = TileGrid(w, h, SIZE, overlap)
    origins = grid.origin(np.arange(grid.n))
    batch = np.stack([rgb[y : y + SIZE, x : x + SIZE] for x, y in origins])
    pred = seg(batch).labels
    ref = np.zeros((h, w), np.int32)
    n = 0
    for i, (x, y) in enumerate(origins):
        keep, *_ = keep_mask(pred[i], int(x), int(y), grid, i % grid.nx, i // grid.nx)
        ids = np.flatnonzero(keep)
        local = np.zeros(len(keep), np.int32)
        local[ids] = np.arange(n + 1, n + 1 + len(ids))
        n += len(ids)
        window = ref[y : y + SIZE, x : x + SIZE]
        window[:] = np.where(local[pred[i]] > 0, local[pred[i]], window)
    assert summary.nuclei == n == labels.max() > 0
    from scipy import ndimage as ndi

    lines = [grid.owned(ix, 0)[0] for ix in range(1, grid.nx)]  # vertical ownership lines
    across = sum(any(b[1].start < x < b[1].stop for x in lines) for b in ndi.find_objects(ref) if b)
    assert across >= 3, "no nucleus straddles an ownership line: the seam check would be vacuous"
    ia, ib, iou = match_instances(ref, labels)
    assert (iou == 1.0).sum() == n, "a nucleus differs from its owning tile's prediction"
    # the cache: a rerun reuses every prediction; another mode is another fingerprint, predicted anew
    again = predict_slide(path, tmp_path / "b.geojson", seg, cfg)
    assert again.predicted_tiles == 0
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()
    other = stand_ins("centers" if mode == "none" else "none", pred_iou_thresh=0.5, stability_thresh=0.5)
    assert other.fingerprint != seg.fingerprint
    third = predict_slide(path, tmp_path / "c.geojson", other, cfg)
    assert third.predicted_tiles == grid.n
    props = json.loads((tmp_path / "a.geojson").read_text())
    assert props["features"] and len(props["features"]) == n


# ------------------------------------------------------------------------------------------------- bench
def test_bench_pareto_puts_the_learned_modes_and_the_classical_segmenter_beside_amg(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pareto as bp

    from nucseg.learn.data import load_dataset
    from nucseg.learn.demo import make_demo_dataset
    from nucseg.model.heads import head_modes

    tiles = load_dataset(make_demo_dataset(tmp_path / "d", tiles_per_organ=1, size=SIZE), tile_size=SIZE)[:2]
    torch.manual_seed(0)
    model = attach_prompt_heads(build_sam("vit_tiny", img_size=SIZE).eval())
    settings = bp.parse_settings("4", "4", "", 16) + bp.parse_learned("0:0,0:1", "0.05:0.9:0", True, head_modes(model))
    per = bp.sweep(settings, model, tiles, {"pred_iou_thresh": -10.0, "stability_thresh": 0.0}, torch.device("cpu"))
    res = bp.summarise(per)
    assert set(res) == {"amg-4", "nucseg-grid-4", "centers-c0-n0", "centers-c0-n1", "none-f0.05-c0.9-b0", "threshold"}
    gt = sum(len(np.unique(t.labels)) - 1 for t in tiles)
    c = res["centers-c0-n0"]
    assert c["prompts_per_gt_nucleus"] == pytest.approx(c["prompts_decoded_per_tile"] * len(tiles) / gt, rel=0.05)
    assert c["decoder_calls_per_tile"] >= 1 and c["encoder_s_per_tile"] > 0 and c["heads_s_per_tile"] > 0
    n = res["none-f0.05-c0.9-b0"]
    assert n["decoder_calls_per_tile"] == 0 and n["decoder_s_per_tile"] == 0 and n["post_s_per_tile"] > 0
    groups = [t.stem for t in tiles]
    learned = bp.learned_vs(per, "wall_s", 20, 0, groups, [0.0])
    assert set(learned) == {"centers", "none", "threshold"}
    assert {"vs_amg", "vs_nucseg"} <= set(learned["centers"]) and learned["none"]["front"]
    report = {"results": res, "wall": bp.fronts_and_ratios(per, "wall_s", 20, 0, groups, []), "learned_wall": learned}
    assert "| centers-c0-n0 |" in bp.pareto_table(report)


def test_centers_calibration_estimate_equals_a_real_run(monkeypatch):
    """Without negative prompts the calibration's estimate is exact: thresholding after point NMS keeps what
    thresholding before it keeps (only a more probable point suppresses another)."""
    from dataclasses import replace

    import nucseg.model.infer as infer
    from nucseg.learn.calibrate import CalibrationConfig, _candidates, _paint

    monkeypatch.setattr(infer, "decode_points", _disc_decoder)
    torch.manual_seed(0)
    model = attach_prompt_heads(build_sam("vit_tiny", img_size=64).eval())
    model.center_head = _EmbeddingCentres()
    tiles = np.random.default_rng(3).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    cfg = InferConfig(prompts="centers", min_area=0)
    seg = SamTileSegmenter(model, cfg)
    cand = _candidates(seg, tiles, CalibrationConfig())
    for c in (0.3, 0.6, 0.9):
        setting = {"pred_iou_thresh": 0.5, "stability_thresh": 0.5, "center_threshold": c, "nms_iou": 0.45,
                   "min_area": 6}
        real = SamTileSegmenter(model, replace(cfg, **setting))(tiles).labels
        assert real.max() > 0 and np.array_equal(_paint(seg, cand, setting), real)


def test_train_tile_size_cuts_the_images_as_cv_does(tmp_path, capsys):
    from nucseg.learn.demo import make_demo_dataset
    from nucseg.model.adapter import read_adapter
    from nucseg_cli.main import main

    data = make_demo_dataset(tmp_path / "d", tiles_per_organ=1, size=256, seed=2)
    assert main(["-q", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "vit_tiny",
                 "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--tile-size", "128",
                 "--calibration-fraction", "0", "--no-prompt-heads", "--method", "decoder"]) == 0
    assert "data: 8 tiles" in capsys.readouterr().err  # 2 images of 256 px, 4 tiles of 128 px each
    info = read_adapter(tmp_path / "run" / "adapter")
    assert info.input_size == 128 and info.modes == ["auto", "grid"] and info.meta["training"]["prompt_heads"] is False
