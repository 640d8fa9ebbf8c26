"""Evaluation: k-NN voting vs brute force, linear probe, attention masks, checkpoint loading, the
three command lines on a tiny folder, the collapse monitor, online k-NN and the curves plot."""
import argparse
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from fastdino.eval import attention, common, knn, linear
from fastdino.eval.common import EvalError, load_backbone, strip_prefixes
from fastdino.monitor import CollapseMonitor, online_knn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------
# k-NN
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_bank,n_query,dim,classes,chunks", [
    (203, 37, 24, 5, dict(query_chunk=7, bank_chunk=33)),  # odd sizes, many bank chunks to merge
    (150, 10, 8, 3, dict()),  # one chunk each
    (9, 4, 8, 7, dict(bank_chunk=4)),  # bank smaller than every k: k is clipped
])
def test_knn_weighted_vote_matches_brute_force(n_bank, n_query, dim, classes, chunks):
    g = torch.Generator().manual_seed(n_bank)
    bank = F.normalize(torch.randn(n_bank, dim, generator=g), dim=1)
    labels = torch.randint(0, classes, (n_bank,), generator=g)
    queries = F.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    ks = (1, 10, 20, 100, 200)
    out = knn.knn_scores(bank.to(DEVICE), labels, queries, ks, 0.07, classes, DEVICE, **chunks)
    for k in ks:
        ref = knn.knn_scores_ref(bank, labels, queries, min(k, n_bank), 0.07, classes)
        got = out[k].double().cpu()
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item()), k
        assert torch.equal(got.argmax(1), ref.argmax(1))


def test_knn_streams_a_cpu_bank():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(100, 16, generator=g), dim=1)  # stays on the CPU
    labels = torch.randint(0, 4, (100,), generator=g)
    queries = F.normalize(torch.randn(13, 16, generator=g), dim=1)
    out = knn.knn_scores(bank, labels, queries, (20,), 0.07, 4, DEVICE, query_chunk=5, bank_chunk=17)[20]
    ref = knn.knn_scores_ref(bank, labels, queries, 20, 0.07, 4)
    assert torch.allclose(out.double().cpu(), ref, rtol=1e-4)


def test_knn_accuracy_and_evaluate():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    top1, top5 = knn.accuracy(scores, torch.tensor([2, 0, 0]))
    assert top1 == pytest.approx(100 / 3) and top5 == pytest.approx(100.0)  # 3 classes: top-5 = top-3
    # well-separated clusters: every k classifies perfectly; unnormalized inputs are normalized
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(3, 32, generator=g) * 5
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 32, generator=g) * 0.3
    res = knn.knn_evaluate(x[:240] * 7, y[:240], x[240:], y[240:], ks=(10, 20, 100, 200))
    assert all(r["top1"] == 100.0 for r in res.values())
    with pytest.raises(EvalError, match="temperature"):
        knn.knn_scores(x, y, x, (10,), 0.0)


# ------------------------------------------------------------------------------------------------
# linear probe
# ------------------------------------------------------------------------------------------------
def test_linear_probe_learns_separable_features():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(5, 48, generator=g)
    y = torch.arange(600) % 5
    x = centers[y] + torch.randn(600, 48, generator=g)  # clusters: linearly separable with a margin
    assert ((torch.cdist(x, centers)).argmin(1) == y).all()
    res = linear.train_linear(x[:450] + 3.0, y[:450], x[450:] + 3.0, y[450:], 5, epochs=20, batch_size=64,
                              device=DEVICE)  # (+3: features need not be centered)
    assert res["best_top1"] >= 98.0 and res["last_top1"] >= 98.0, res["runs"]
    assert set(res["runs"]) == set(linear.DEFAULT_LRS) and len(res["runs"][0.1]["history"]) == 20
    shuffled = y[torch.randperm(600, generator=g)]
    chance = linear.train_linear(x[:450], shuffled[:450], x[450:], shuffled[450:], 5, epochs=3, lrs=(0.1,),
                                 batch_size=64, device=DEVICE)
    assert chance["best_top1"] < 50.0  # random labels: no spurious success on held-out data


def test_linear_features_layout():
    model = load_backbone(None, arch="vit_tiny")
    x = torch.randn(2, 3, 32, 32)
    f = linear.linear_features(model, x, 4, False)
    assert f.shape == (2, 4 * 192)
    assert torch.allclose(f[:, -192:], model(x), atol=1e-5)  # last block's [CLS] = forward()
    f = linear.linear_features(model, x, 1, True)
    assert f.shape == (2, 2 * 192)
    assert linear.default_feature_layout("vit_base") == (1, True)
    assert linear.default_feature_layout("vit_small") == (4, False)


# ------------------------------------------------------------------------------------------------
# attention masks
# ------------------------------------------------------------------------------------------------
def _mask_ref(values, keep):
    """Greedy: take the largest entries until their share reaches `keep`."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    total, acc, kept = sum(values), 0.0, set()
    for i in order:
        if acc >= keep * total:
            break
        kept.add(i)
        acc += values[i]
    return kept


@pytest.mark.parametrize("keep", [0.6, 0.3, 0.95])
def test_mass_threshold_keeps_the_right_mass(keep):
    g = torch.Generator().manual_seed(4)
    attn = torch.rand(6, 97, generator=g) ** 4  # peaked, like attention
    mask = attention.mass_threshold_mask(attn, keep)
    for a, m in zip(attn, mask):
        share = a[m].sum() / a.sum()
        assert share >= keep - 1e-6
        assert share - a[m].min() / a.sum() < keep  # dropping the smallest kept entry goes below keep
        assert a[m].min() >= a[~m].max()  # the kept entries are the largest ones
        assert set(torch.nonzero(m).flatten().tolist()) == _mask_ref(a.tolist(), keep)
    flat = torch.ones(1, 10)
    assert attention.mass_threshold_mask(flat, 0.6).sum() == 6  # uniform map: 60% of the entries
    with pytest.raises(EvalError, match="threshold"):
        attention.mass_threshold_mask(attn, 0.0)


def test_jaccard():
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True
    b[1:3] = True
    assert attention.jaccard(a, b) == pytest.approx(4 / 12)
    assert attention.jaccard(a, a) == 1.0


# ------------------------------------------------------------------------------------------------
# checkpoint loading
# ------------------------------------------------------------------------------------------------
def _wrapped(seed):
    from fastdino.models import DINOHead, MultiCropWrapper, vit_tiny

    torch.manual_seed(seed)
    return MultiCropWrapper(vit_tiny(patch_size=16), DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16))


def _same_params(model, ref):
    ref_sd = ref.state_dict()
    return all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())


def test_load_backbone_handles_all_checkpoint_layouts(tmp_path):
    student, teacher = _wrapped(0), _wrapped(1)
    prefixed = {f"module.{k}": v for k, v in student.state_dict().items()}  # saved from DDP
    rng = {"numpy": np.random.get_state(), "python": random.getstate(), "torch": torch.get_rng_state()}

    ours = tmp_path / "fastdino.pth"
    torch.save({"student": prefixed, "teacher": teacher.state_dict(), "optimizer": {}, "epoch": 1, "step": 5,
                "config": {"model": {"arch": "vit_tiny", "patch_size": 16, "out_dim": 64}}, "rng": rng}, ours)
    official = tmp_path / "official.pth"
    torch.save({"student": prefixed, "teacher": {f"backbone.{k}": v for k, v in teacher.backbone.state_dict().items()}
                | {f"head.{k}": v for k, v in teacher.head.state_dict().items()}, "optimizer": {}, "epoch": 3,
                "args": argparse.Namespace(arch="vit_tiny", patch_size=16), "dino_loss": {}}, official)
    plain = tmp_path / "plain.pth"
    torch.save(teacher.backbone.state_dict(), plain)

    for path in (ours, official):
        assert _same_params(load_backbone(str(path), "teacher"), teacher.backbone)
        assert _same_params(load_backbone(str(path), "student"), student.backbone)
    model = load_backbone(str(plain))  # arch and patch size inferred from the shapes
    assert model.arch == "vit_tiny" and _same_params(model, teacher.backbone)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training

    with pytest.raises(EvalError, match="vit_small"):
        load_backbone(str(plain), arch="vit_small")
    with pytest.raises(EvalError, match="patch size"):
        load_backbone(str(plain), patch_size=8)
    torch.save({"teacher": teacher.state_dict()}, tmp_path / "t.pth")
    with pytest.raises(EvalError, match="no 'student'"):
        load_backbone(str(tmp_path / "t.pth"), "student")
    with pytest.raises(EvalError, match="does not exist"):
        load_backbone(str(tmp_path / "missing.pth"))

    # depth: read from the weights (a 3-block backbone), checked against an explicit one
    from fastdino.models import vit_tiny

    shallow = tmp_path / "shallow.pth"
    torch.save(vit_tiny(patch_size=16, depth=3).state_dict(), shallow)
    assert len(load_backbone(str(shallow)).blocks) == 3 and len(load_backbone(str(shallow), depth=3).blocks) == 3
    with pytest.raises(EvalError, match="3 blocks, not --depth 12"):
        load_backbone(str(shallow), depth=12)
    assert len(load_backbone(None, arch="vit_tiny", depth=2).blocks) == 2


def test_random_init_dinov2_backbone_is_patch_14():
    from fastdino.eval.common import load_backbone

    model = load_backbone(None, arch="dinov2_vits14", depth=1)
    assert model.patch_size == 14 and model.patch_embed.proj.kernel_size == (14, 14)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 384)


def test_dinov2_backbones_load_and_evaluate(tmp_path):
    """A DINOv2-layout state dict (registers, LayerScale, mask token; a training checkpoint's or a
    plain backbone file) is rebuilt from its keys and gives the same features; k-NN, linear probe
    (patch-token mean after the registers) and attention maps run on it."""
    from fastdino.models import dinov2_vits14

    torch.manual_seed(0)
    src = dinov2_vits14(num_register_tokens=4, depth=2).eval()
    path = str(tmp_path / "backbone.pth")
    torch.save(src.state_dict(), path)
    model = load_backbone(path)
    assert (model.arch, model.patch_size, model.num_register_tokens, len(model.blocks)) == ("dinov2_vits14", 14, 4, 2)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(model(x), src(x), atol=1e-5)
        assert linear.linear_features(model, x, 1, avgpool=True).shape == (2, 2 * 384)
    data = _color_folder(tmp_path / "data")
    args = ["--checkpoint", path, "--data_path", str(data), "--image_size", "28", "--num_workers", "0",
            "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    assert knn.main(args + ["--nb_knn", "3"])["arch"] == "dinov2_vits14"
    Image.fromarray(np.full((28, 42, 3), 200, np.uint8)).save(tmp_path / "a.png")
    rep = attention.main(["--checkpoint", path, "--images", str(tmp_path / "a.png"), "--image_size", "28",
                          "--output_dir", str(tmp_path / "attn"), "--device", "cpu"])
    assert rep["images"]["a"]["size"] == [42, 28]  # 2 x 3 patches: the registers are not taken for patches


def test_strip_prefixes_and_pos_embed_resize(tmp_path):
    sd = {"module.backbone.blocks.0.attn.qkv.weight": torch.ones(1), "module.head.mlp.0.weight": torch.ones(1),
          "backbone.norm.bias": torch.ones(1), "cls_token": torch.ones(1)}
    assert sorted(strip_prefixes(sd)) == ["blocks.0.attn.qkv.weight", "cls_token", "norm.bias"]
    # a backbone trained with another grid size: pos_embed is resized on load (cls token kept)
    from fastdino.models import vit_tiny

    torch.manual_seed(0)
    src = vit_tiny(patch_size=16, img_size=96)  # 6x6 grid
    path = tmp_path / "b.pth"
    torch.save(src.state_dict(), path)
    model = load_backbone(str(path))
    assert model.pos_embed.shape == (1, 197, 192)
    assert torch.equal(model.pos_embed[:, 0], src.pos_embed[:, 0])
    assert torch.equal(model.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)


# ------------------------------------------------------------------------------------------------
# command lines on a tiny labeled folder (random-init vit_tiny: checks plumbing, not accuracy)
# ------------------------------------------------------------------------------------------------
def _color_folder(root, per_class=6, size=40):
    colors = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]
    for c, color in enumerate(colors):
        os.makedirs(root / f"class{c}", exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(color) + np.random.default_rng(c * 100 + i).normal(0, 20, (size, size + 8, 3)),
                          0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.jpg")
    return root


def test_knn_and_linear_cli(tmp_path, capsys):
    data = _color_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--random_init", "--arch", "vit_tiny", "--data_path", str(data), "--image_size", "32",
            "--num_workers", "0", "--output_dir", str(out), "--device", DEVICE]
    rep = knn.main(args + ["--nb_knn", "3", "20"])
    assert rep["num_train"] + rep["num_val"] == 18 and rep["results"]["20"]["k_used"] == rep["num_train"]
    saved = json.loads((out / "knn-random.json").read_text())
    assert saved["results"]["3"]["top1"] == rep["results"]["3"]["top1"]
    cache = sorted(os.listdir(out / "cache"))
    assert len(cache) == 2  # train and val features
    rep2 = knn.main(args + ["--nb_knn", "3", "20"])  # second run reads the cache
    assert rep2["results"] == rep["results"] and sorted(os.listdir(out / "cache")) == cache
    lin = linear.main(args + ["--epochs", "3", "--lr", "0.1"])
    assert lin["n_last_blocks"] == 4 and 0.0 <= lin["last_top1"] <= 100.0
    assert (out / "linear-random.json").exists()
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" not in printed  # 3 classes: top-5 is 100% by construction
    assert all("top5" not in r for r in rep["results"].values()) and "top5" not in saved["results"]["3"]


def test_knn_reports_top5_only_with_more_than_5_classes(tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    for classes, has_top5 in ((7, True), (6, True), (5, False), (3, False)):
        x, y = torch.randn(60, 8, generator=g), torch.arange(60) % classes
        res = knn.knn_evaluate(x[:40], y[:40], x[40:], y[40:], ks=(40,), num_classes=classes)[40]
        assert ("top5" in res) == has_top5, classes
        if has_top5:  # k = the whole bank: every class has votes, no ties at the 5th place
            ref = knn.knn_scores_ref(F.normalize(x[:40], dim=1), y[:40], F.normalize(x[40:], dim=1), 40, 0.07, classes)
            hits = [bool((ref[i].argsort(descending=True)[:5] == y[40 + i]).any()) for i in range(20)]
            assert res["top5"] == pytest.approx(100.0 * sum(hits) / 20) and res["top5"] < 100.0
    root = tmp_path / "six"  # the command: a top-5 column with 6 classes
    for c in range(6):
        os.makedirs(root / f"c{c}")
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * c + 5 * i, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    rep = knn.main(["--random_init", "--arch", "vit_tiny", "--depth", "1", "--data_path", str(root), "--image_size",
                    "16", "--num_workers", "0", "--output_dir", str(tmp_path / "out"), "--device", DEVICE,
                    "--nb_knn", "5"])
    assert "top5" in rep["results"]["5"] and "| top-5 (%) |" in capsys.readouterr().out


def test_eval_workers_default_to_min_4_and_the_cpus(monkeypatch):
    argv = ["--random_init", "--arch", "vit_tiny", "--data_path", "unused"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # a 2-core machine
    assert knn.parse_args(argv).num_workers == 2 and linear.parse_args(argv).num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert knn.parse_args(argv).num_workers == 4
    assert knn.parse_args(argv + ["--num_workers", "7"]).num_workers == 7  # an explicit value wins
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # no affinity API (macOS): cpu_count
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert common.default_num_workers() == 3


def _corrupt(path) -> str:
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return str(path)


def test_evaluation_commands_skip_unreadable_images(tmp_path, caplog):
    """A corrupt image in the labeled folder (k-NN, linear probe) or the image list (attention maps)
    is skipped, named once in the log and counted in the report; the command finishes."""
    data = _color_folder(tmp_path / "data")
    bad = _corrupt(data / "class1" / "broken.jpg")
    out = tmp_path / "out"
    args = ["--random_init", "--arch", "vit_tiny", "--data_path", str(data), "--image_size", "32",
            "--num_workers", "0", "--output_dir", str(out), "--device", DEVICE]
    with caplog.at_level("WARNING", logger="fastdino"):
        rep = knn.main(args + ["--nb_knn", "3"])
        rep2 = knn.main(args + ["--nb_knn", "3"])  # from the feature cache: skipped and named again
        lin = linear.main(args + ["--epochs", "1", "--lr", "0.1"])
    for r in (rep, rep2, lin):
        assert r["unreadable_images"] == 1 and r["num_train"] + r["num_val"] == 18, r
    named = [m for m in caplog.messages if "broken.jpg" in m]
    assert len(named) == 3 and all(m.startswith("evaluation: skipped unreadable image") for m in named), named
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(images / "ok.png")
    _corrupt(images / "bad.png")
    rep = attention.main(["--random_init", "--arch", "vit_tiny", "--images", str(images), "--image_size", "32",
                          "--output_dir", str(tmp_path / "attn"), "--device", DEVICE])
    assert list(rep["images"]) == ["ok"] and rep["unreadable_images"] == 1
    assert bad.endswith("broken.jpg")


def test_attention_cli_writes_pngs_and_jaccard(tmp_path):
    img = np.zeros((48, 64, 3), np.uint8)
    img[8:40, 16:48] = (250, 250, 250)
    Image.fromarray(img).save(tmp_path / "a.png")
    mask = Image.fromarray((img[..., 0] > 128).astype(np.uint8), mode="L").convert("P")  # palette indices
    mask.save(tmp_path / "a_gt.png")
    out = tmp_path / "attn"
    rep = attention.main(["--random_init", "--arch", "vit_tiny", "--images", str(tmp_path / "a.png"),
                          "--masks", str(tmp_path / "a_gt.png"), "--image_size", "48", "--output_dir", str(out),
                          "--device", DEVICE, "--per_image"])
    files = set(os.listdir(out / "a"))
    for h in ("head0", "head1", "head2", "mean"):
        assert {f"attn-{h}.png", f"mask-{h}.png", f"overlay-{h}.png"} <= files
    assert {"img.png", "grid.png"} <= files
    with Image.open(out / "a" / "mask-head0.png") as m:
        assert m.size == (64, 48)
    j = rep["images"]["a"]["jaccard"]
    assert len(j["per_head"]) == 3 and j["best"] == max(j["per_head"]) and 0 <= j["mean_attention"] <= 1
    assert json.loads((out / "attention.json").read_text())["mean"]["best"] == pytest.approx(j["best"])
    gt = attention.load_gt_mask(str(tmp_path / "a_gt.png"), 48, 16)
    assert gt.shape == (48, 64) and gt.sum() == 32 * 32


def test_attention_summary_grid_max_images_and_per_image(tmp_path, capsys):
    """Five images, --max_images 3: the first three in sorted order, one line saying 2 were skipped, one
    labelled grid (a header band of column labels with the heads' colours; per image a name strip and
    image | 3 heads | mean mask | overlay, each fitted to a cell) and no per-image files; --per_image
    adds each image's 14 PNGs; --mask_dir needs masks only for the processed images."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = [(32, 32), (48, 32), (32, 64), (32, 32), (32, 32)]  # (w, h)
    for i, (w, h) in enumerate(sizes):
        arr = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{4 - i}.png")  # written in reverse: the order is the sort's
    out, cell = tmp_path / "attn", 40
    base = ["--random_init", "--arch", "vit_tiny", "--depth", "2", "--images", str(folder), "--image_size", "32",
            "--cell_size", str(cell), "--device", DEVICE]
    rep = attention.main(base + ["--max_images", "3", "--output_dir", str(out)])
    assert "first 3 of 5 images" in capsys.readouterr().out and rep["skipped_images"] == 2
    assert list(rep["images"]) == ["im0", "im1", "im2"] and rep["grid"] == str(out / "attention_grid.png")
    assert sorted(os.listdir(out)) == ["attention.json", "attention_grid.png"]  # no per-image files
    cols = 3 + 3  # image, 3 heads (vit_tiny), mean mask, overlay
    with Image.open(out / "attention_grid.png") as im:
        grid = np.asarray(im.convert("RGB")).astype(int)
    assert grid.shape == (attention.GRID_HEADER + 3 * (attention.GRID_NAME + cell) + 2 * attention.GRID_GAP,
                          cols * cell + (cols - 1) * attention.GRID_GAP, 3)
    header = grid[:attention.GRID_HEADER]
    for c in range(cols):  # a label in every column of the header band
        x = c * (cell + attention.GRID_GAP)
        assert (header[:, x:x + cell].sum(-1) < 200).any(), f"no label over column {c}"
    for h in range(3):  # each head's label carries its overlay colour
        x = (1 + h) * (cell + attention.GRID_GAP)
        assert tuple(header[9, x + 4]) == attention._HEAD_COLORS[h]
    # row 0 (im0, 32x32: 2x2 patches): the mean-mask column is the head-averaged map's mask
    y0 = attention.GRID_HEADER + attention.GRID_NAME
    mask_cell = grid[y0:y0 + cell, 4 * (cell + attention.GRID_GAP):][:, :cell]
    assert set(np.unique(mask_cell)) <= {0, 255}
    kept = rep["images"]["im0"]["kept_fraction_of_patches"][-1]
    assert (mask_cell[..., 0] == 255).mean() == pytest.approx(kept)
    # row 2 (im2, 32x64 after resizing, 2x4 patches): fitted to the cell, aspect kept, white beside it
    y2 = y0 + 2 * (attention.GRID_NAME + cell + attention.GRID_GAP)
    image_cell = grid[y2:y2 + cell, :cell]
    assert (image_cell[:, cell // 2:] == 255).all() and not (image_cell[:, :cell // 2] == 255).all()

    masks = tmp_path / "gt"
    masks.mkdir()
    for name in ("im0", "im1"):  # none for im2..im4: not processed with --max_images 2
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(masks / f"{name}.png")
    out2 = tmp_path / "attn2"
    rep = attention.main(base + ["--max_images", "2", "--per_image", "--mask_dir", str(masks),
                                 "--output_dir", str(out2)])
    assert sorted(os.listdir(out2)) == ["attention.json", "attention_grid.png", "im0", "im1"]
    assert all(len(os.listdir(out2 / n)) == 14 for n in ("im0", "im1"))  # img, grid, 3 kinds x (3 heads + mean)
    assert rep["mean"]["best"] >= 0 and rep["skipped_images"] == 3
    with pytest.raises(EvalError, match="max_images"):
        attention.main(base + ["--max_images", "0"])


# ------------------------------------------------------------------------------------------------
# monitoring
# ------------------------------------------------------------------------------------------------
def test_collapse_monitor():
    K = 4096
    log_k = math.log(K)
    m = CollapseMonitor(K, patience=3, warmup=2)
    healthy = [(log_k * 0.99, 0.0), (log_k * 0.99, 0.0)] + [(4.0, 0.8)] * 10  # warmup near ln K: ignored
    assert all(m.update(h, kl) is None for h, kl in healthy) and m.flag is None
    # one noisy log step at an extreme does not warn
    assert m.update(0.01, 0.8) is None and m.update(4.0, 0.8) is None
    warnings = [m.update(0.01, 1e-4, step=100 + i) for i in range(3)]
    assert warnings[:2] == [None, None] and "entropy near 0" in warnings[2] and "step 102" in warnings[2]
    assert m.flag == "COLLAPSE? H->0"
    assert m.update(0.01, 1e-4) is None and m.flag is not None  # not repeated every step
    assert m.update(4.0, 0.8) is None and m.flag is None  # recovered
    m2 = CollapseMonitor(K, patience=2, warmup=0)
    assert m2.update(log_k - 1e-3, 1e-5) is None
    assert "uniform" in m2.update(log_k - 1e-3, 1e-5)
    sk = CollapseMonitor(K, patience=1, warmup=0, targets="sinkhorn_knopp")
    assert "Sinkhorn-Knopp" in sk.update(log_k - 1e-3, 0.5)  # the hint fits the targets
    m3 = CollapseMonitor(K, patience=2, warmup=0)
    m3.update(5.0, 1e-5)
    assert "KL near 0" in m3.update(5.0, 1e-5)
    assert "non-finite" in CollapseMonitor(K, patience=1).update(float("nan"), 0.5)
    with pytest.raises(ValueError):
        CollapseMonitor(1)


class _MeanColor(nn.Module):
    """A 'backbone' whose features are the mean color: separates color classes perfectly."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.mean((2, 3)) * self.scale


def test_online_knn(tmp_path):
    data = _color_folder(tmp_path / "data", per_class=6, size=24)
    from fastdino.monitor import knn_holdout

    bank, queries = knn_holdout(str(data), n_per_class=6)
    assert len(bank) + len(queries) == 18 and {y for _, y in queries} == {0, 1, 2}
    backbone = _MeanColor().to(DEVICE).train()
    assert online_knn(backbone, bank, queries, DEVICE, image_size=16, k=5) == 100.0
    assert backbone.training  # mode restored
    tiny = load_backbone(None, arch="vit_tiny", device=DEVICE)
    top1 = online_knn(tiny, bank, queries, DEVICE, image_size=16, k=5)
    assert 0.0 <= top1 <= 100.0
    _corrupt(tmp_path / "data" / "class0" / "0_broken.jpg")  # sorts first: in the holdout
    bank, queries = knn_holdout(str(data), n_per_class=6)
    assert any("0_broken" in p for p, _ in bank + queries)
    assert online_knn(backbone, bank, queries, DEVICE, image_size=16, k=5) == 100.0  # skipped, not fatal


# ------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------
def _metrics(run):
    os.makedirs(run, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(12):
            rec = {"step": step, "epoch": step // 4, "loss": 8 - 0.1 * step, "lr": 1e-4 * step, "wd": 0.04}
            if step % 4 == 3:
                rec.update(teacher_entropy=7.0 - 0.2 * step, kl=0.5 + 0.01 * step, images_per_s=100.0,
                           knn_top1=30.0 + step)
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 12, "loss"')  # a line cut by a killed run is skipped
    (run / "config.json").write_text(json.dumps({"model": {"out_dim": 4096}}))


def test_plot_reads_each_step_once_after_a_resume():
    from fastdino.plot import latest_per_step

    first = [{"step": s, "loss": 1.0} for s in range(6)] + [{"step": 5, "knn_top1": 50.0}]
    again = [{"step": s, "loss": 2.0} for s in range(4, 8)]  # resumed from step 4: 4 and 5 logged again
    got = latest_per_step(first + again)
    assert [(r["step"], r.get("loss")) for r in got] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0),
                                                         (5, 2.0), (6, 2.0), (7, 2.0)]


def test_plot(tmp_path, monkeypatch):
    from fastdino import plot

    _metrics(tmp_path / "run")
    recs, cfg = plot.read_metrics(str(tmp_path / "run"))
    assert len(recs) == 12 and cfg["model"]["out_dim"] == 4096
    xs, ys = plot.series(recs, "knn_top1", "epoch")
    assert xs == [0.75, 1.75, 2.75] and ys == [33.0, 37.0, 41.0]
    with pytest.raises(plot.PlotError, match="no metrics log"):
        plot.read_metrics(str(tmp_path / "nothing"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed")
    assert plot.main([str(tmp_path / "run"), "--x", "epoch"]) == 0
    with Image.open(tmp_path / "run" / "curves.png") as im:
        assert im.size[0] > 500
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    with pytest.raises(plot.PlotError, match="pip install matplotlib"):
        plot.plot_runs([str(tmp_path / "run")], str(tmp_path / "x.png"))
