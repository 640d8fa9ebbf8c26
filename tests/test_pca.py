"""PCA of patch features (fastdino.eval.pca): the two-stage PCA on synthetic features whose answer
is known (foreground mask, colors, the sign rules), the PCA against a covariance eigen-decomposition,
and the command line end to end on tiny DINO v1 and DINOv2-with-registers checkpoints."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.eval import pca as pca_mod
from fastdino.eval.common import EvalError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic(n_img=3, h=12, w=16, d=32, box=(3, 9, 4, 11), seed=0):
    """Features [n_img, h, w, d]: background = offset + small noise; inside `box` (rows r0:r1, cols
    c0:c1) a strong shift along e0 plus structure along e1 (row ramp, largest), e2 (column ramp) and
    e3 (checkerboard, smallest). Returns (features, foreground mask, row ramp, col ramp, checker, e)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T.float()  # orthonormal rows
    f = 0.03 * torch.randn(n_img, h, w, d, generator=g) + 2.0 * e[5]
    r0, r1, c0, c1 = box
    mask = torch.zeros(n_img, h, w, dtype=torch.bool)
    mask[:, r0:r1, c0:c1] = True
    rows = torch.zeros(h, w)
    cols = torch.zeros(h, w)
    checker = torch.zeros(h, w)
    rows[r0:r1, c0:c1] = torch.linspace(-1, 1, r1 - r0)[:, None]
    cols[r0:r1, c0:c1] = torch.linspace(-1, 1, c1 - c0)[None, :]
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker[r0:r1, c0:c1] = (((ii + jj) % 2) * 2.0 - 1.0)[r0:r1, c0:c1]
    inside = mask[..., None].float()
    f = f + inside * (6.0 * e[0] + 2.0 * rows[..., None] * e[1] + 1.0 * cols[..., None] * e[2]
                      + 0.5 * checker[..., None] * e[3])
    return f, mask, rows, cols, checker, e


def _abs_corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b).abs() / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------------------------
# the math
# ------------------------------------------------------------------------------------------------
def test_pca_rgb_recovers_foreground_and_its_structure():
    f, mask, rows, cols, checker, _ = _synthetic()
    rgb, fg = pca_mod.pca_rgb(f)
    assert rgb.shape == (3, 12, 16, 3) and rgb.dtype == torch.float32 and fg.shape == (3, 12, 16)
    assert torch.equal(fg, mask)
    assert (rgb[~fg] == 0).all()  # background black
    on = rgb[fg]
    assert on.min() >= 0 and on.max() <= 1
    assert torch.allclose(on.min(0).values, torch.zeros(3)) and torch.allclose(on.max(0).values, torch.ones(3))
    # second PCA: R follows the strongest within-object variation (rows), G the columns, B the checker
    inside = mask[0]
    for c, truth in enumerate((rows, cols, checker)):
        for i in range(3):
            assert _abs_corr(rgb[i, ..., c][inside], truth[inside]) > 0.98, (c, i)
    # deterministic
    rgb2, fg2 = pca_mod.pca_rgb(f.clone())
    assert torch.equal(rgb, rgb2) and torch.equal(fg, fg2)


@pytest.mark.parametrize("sign_rule", pca_mod.SIGN_RULES)
def test_sign_rule_makes_the_foreground_independent_of_the_feature_sign(sign_rule):
    f, mask, _, _, _, e = _synthetic(seed=1)
    reflected = f - 2 * (f @ e[0])[..., None] * e[0]  # the foreground direction flipped
    for feats in (f, -f, reflected):
        _, fg = pca_mod.pca_rgb(feats, sign_rule=sign_rule)
        assert torch.equal(fg, mask)
    # the rule itself on a 1-D score: border patches put on the negative side
    score = torch.tensor([1.0, 1.0, 1.0, 1.0, -3.0, 1.0, 1.0, 1.0, 1.0])  # 3x3 grid, centre low
    assert pca_mod.orient_first_component(score, [(3, 3)], "border") == -1.0
    assert pca_mod.orient_first_component(-score, [(3, 3)], "border") == 1.0
    assert pca_mod.orient_first_component(score, [(3, 3)], "minority") == -1.0  # 8 positive of 9: flip


def test_border_and_minority_rules_differ_on_a_large_object():
    """An object filling 70% of every image: the border rule keeps it as the foreground; the minority
    rule takes the (smaller) frame around it. Grids where every patch is a border patch fall back to
    the minority rule."""
    f, mask, *_ = _synthetic(box=(1, 11, 1, 15), seed=2)
    assert mask.float().mean() > 0.5
    _, fg_border = pca_mod.pca_rgb(f, sign_rule="border")
    _, fg_minority = pca_mod.pca_rgb(f, sign_rule="minority")
    assert torch.equal(fg_border, mask) and torch.equal(fg_minority, ~mask)
    flat = torch.tensor([2.0, -1.0, -1.0, 0.0])  # a 2x2 grid: all border -> minority (1 positive of 3)
    assert pca_mod.orient_first_component(flat, [(2, 2)], "border") == 1.0
    assert pca_mod.orient_first_component(-flat, [(2, 2)], "border") == -1.0
    with pytest.raises(EvalError, match="sign_rule"):
        pca_mod.orient_first_component(flat, [(2, 2)], "norm")


def test_threshold_and_lists_of_grids():
    f, mask, *_ = _synthetic(seed=3)
    _, fg0 = pca_mod.pca_rgb(f, threshold=0.0)
    _, fg1 = pca_mod.pca_rgb(f, threshold=1.0)  # the object's z-score is ~ +1.9: still all of it
    assert torch.equal(fg0, mask) and torch.equal(fg1, mask)
    with pytest.raises(EvalError, match="leaves no foreground patch"):
        pca_mod.pca_rgb(f, threshold=5.0)
    # images with different grids are pooled: a list in, lists out
    g, gmask, *_ = _synthetic(n_img=1, h=10, w=14, box=(2, 8, 3, 9), seed=3)
    rgb, fg = pca_mod.pca_rgb([f[0], g[0], f[1]])
    assert [tuple(x.shape) for x in rgb] == [(12, 16, 3), (10, 14, 3), (12, 16, 3)]
    assert torch.equal(fg[0], mask[0]) and torch.equal(fg[1], gmask[0]) and torch.equal(fg[2], mask[1])
    with pytest.raises(EvalError, match="one D"):
        pca_mod.pca_rgb([f[0], f[0, ..., :8]])


def test_pca_matches_covariance_eigendecomposition():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    x = rng.normal(size=(300, 12)) * np.array([5.0, 3.0, 2.0, 1.5, 1, 1, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2]) @ q.T + 7.0
    cov = np.cov(x, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    comps, scores, var = pca_mod.pca(torch.tensor(x, dtype=torch.float32), 4)
    comps, scores, var = comps.numpy(), scores.numpy(), var.numpy()
    for i in range(4):
        assert abs(abs(comps[i] @ vecs[:, i]) - 1) < 1e-5, i  # the same axis, up to sign
    np.testing.assert_allclose(var, vals[:4], rtol=1e-5)
    np.testing.assert_allclose(comps @ comps.T, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(scores, (x.astype(np.float32) - x.astype(np.float32).mean(0)) @ comps.T,
                               rtol=1e-4, atol=1e-3)
    # sign convention: each component's largest-magnitude score is positive
    assert (scores[np.abs(scores).argmax(0), np.arange(4)] > 0).all()
    # more components than the rank: zero-padded
    c, s, v = pca_mod.pca(torch.randn(3, 5), 5)
    assert c.shape == (5, 5) and (c[3:] == 0).all() and (s[:, 3:] == 0).all() and (v[3:] == 0).all()


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _picture(path, h, w, seed):
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.normal(90, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    arr[h // 4:3 * h // 4, w // 4:3 * w // 4] = (230, 200, 40)  # a centered object
    Image.fromarray(arr).save(path)
    return str(path)


def _size(path):
    with Image.open(path) as im:
        return im.size


def test_cli_dino_v1_checkpoint(tmp_path, capsys):
    from fastdino.models import vit_tiny

    torch.manual_seed(0)
    ckpt = tmp_path / "backbone.pth"
    torch.save(vit_tiny(patch_size=8, depth=2).state_dict(), ckpt)
    folder = tmp_path / "imgs"
    folder.mkdir()
    _picture(folder / "a.png", 40, 56, 0)
    _picture(folder / "b.jpg", 48, 48, 1)
    out = folder / "pca"  # inside the image folder: its pictures are not taken as inputs on a rerun
    args = ["--checkpoint", str(ckpt), "--images", str(folder), "--image_size", "32", "--output_dir", str(out),
            "--device", "cpu"]
    assert pca_mod.cli(args) == 0 and pca_mod.cli(args) == 0
    rep = json.loads((out / "pca.json").read_text())
    assert (rep["arch"], rep["patch_size"], rep["num_register_tokens"]) == ("vit_tiny", 8, 0)
    a, b = rep["images"]["a"], rep["images"]["b"]
    assert a["size"] == [40, 32] and a["grid"] == [4, 5] and a["patch_tokens"] == 20  # 32x45 cropped to 32x40
    assert b["size"] == [32, 32] and b["grid"] == [4, 4] and b["patch_tokens"] == 16
    assert list(rep["images"]) == ["a", "b"] and rep["patches"] == 36 and 0 < rep["foreground_patches"] < 36
    assert _size(out / "a.png") == (40, 32) and _size(out / "a-side.png") == (84, 32)
    assert _size(out / "b.png") == (32, 32) and _size(out / "b-side.png") == (68, 32)
    with Image.open(out / "a.png") as im:  # nearest upsampling: constant over each 8x8 patch
        arr = np.asarray(im)
    assert (arr == np.repeat(np.repeat(arr[::8, ::8], 8, 0), 8, 1)).all()
    assert "foreground" in capsys.readouterr().out


def test_cli_dinov2_with_registers(tmp_path):
    from fastdino.models import dinov2_vits14
    from fastdino.eval.common import load_backbone

    torch.manual_seed(0)
    ckpt = str(tmp_path / "backbone.pth")
    torch.save(dinov2_vits14(num_register_tokens=4, depth=2).state_dict(), ckpt)
    img = _picture(tmp_path / "cat.png", 28, 42, 2)
    _picture(tmp_path / "dog.png", 56, 56, 3)
    out = tmp_path / "pca"
    rep = pca_mod.main(["--checkpoint", ckpt, "--images", img, str(tmp_path / "dog.png"), "--image_size", "28",
                        "--output_dir", str(out), "--device", "cpu", "--threshold", "-0.5"])
    assert (rep["arch"], rep["patch_size"], rep["num_register_tokens"]) == ("dinov2_vits14", 14, 4)
    assert rep["images"]["cat"]["grid"] == [2, 3] and rep["images"]["cat"]["patch_tokens"] == 6
    assert rep["images"]["dog"]["grid"] == [2, 2] and rep["images"]["dog"]["patch_tokens"] == 4
    assert rep["patches"] == 10  # the 4 registers and [CLS] of each image are not patches
    assert _size(out / "cat.png") == (42, 28) and _size(out / "cat-side.png") == (88, 28)
    # the features used are the normed patch tokens after the registers
    model = load_backbone(ckpt)
    x = torch.randn(1, 3, 28, 42)
    feats = pca_mod.patch_features(model, x)
    with torch.no_grad():
        tokens = model.get_intermediate_layers(x, 1)[0]
    assert tokens.shape[1] == 1 + 4 + 6 and feats.shape == (1, 2, 3, 384)
    assert torch.allclose(feats.reshape(1, 6, 384), tokens[:, 5:], atol=1e-5)


def _corrupt(path):
    path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return str(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    img = _picture(tmp_path / "a.png", 32, 32, 0)
    missing = str(tmp_path / "missing.pth")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fastdino.eval.pca", "--checkpoint", missing, "--images", img,
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr == f"fastdino: error: checkpoint '{missing}' does not exist\n"

    base = ["--random_init", "--arch", "vit_tiny", "--depth", "1", "--image_size", "32", "--device", "cpu",
            "--output_dir", str(tmp_path / "out")]
    assert pca_mod.cli(base + ["--images", str(tmp_path / "nope.png")]) == 2
    assert capsys.readouterr().err == f"fastdino: error: image '{tmp_path / 'nope.png'}' does not exist\n"
    bad = _corrupt(tmp_path / "bad.jpg")
    assert pca_mod.cli(base + ["--images", bad]) == 2
    assert capsys.readouterr().err.startswith("fastdino: error: none of the 1 images could be read")
    # an unreadable image next to readable ones is skipped and counted, as by the other commands
    rep = pca_mod.main(base + ["--images", img, bad])
    assert list(rep["images"]) == ["a"] and rep["unreadable_images"] == 1
