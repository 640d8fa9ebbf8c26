"""Data pipeline (torch backend): sources, demo data, the recipe's distributions, the batched
photometric ops against references, sharding, determinism and bad files."""
import colorsys
import io
import math
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.config import DataConfig
from fastdino.data import DataError, ImageFolder, ImageSource, build_train_loader, generate_demo_dataset, resolve_backend
from fastdino.data.augment import (IMAGENET_MEAN, IMAGENET_STD, N_DRAWS, RATIO, DataAugmentationDINORef, adjust_hue,
                                   crop_specs, gaussian_blur, photometric, photometric_params, pil_to_uint8,
                                   resized_crop_boxes, resized_crop_pil, stack_params, uniforms)
from fastdino.data.folder import image_size_from_header
from fastdino.data.torch_loader import EpochBatches

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def binomial_ok(hits, n, p, sigmas=4.5):
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return generate_demo_dataset(str(tmp_path_factory.mktemp("demo") / "d"), num_images=48, num_classes=3,
                                 image_size=40, seed=1)


def small_cfg(path, **kw):
    base = dict(path=path, backend="torch", num_workers=0, global_crop_size=32, local_crop_size=16,
                local_crops_number=3)
    base.update(kw)
    return DataConfig(**base)


# ----------------------------------------------------------------------------- sources
def test_image_folder_labels_nesting_and_errors(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    (tmp_path / "b" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    img.save(tmp_path / "b" / "deep" / "er" / "x.JPEG")
    img.save(tmp_path / "a" / "y.png")
    img.save(tmp_path / "root.jpg")
    (tmp_path / "a" / "notes.txt").write_text("no image")
    f = ImageFolder(str(tmp_path))
    assert f.classes == ["a", "b"]
    assert sorted((os.path.basename(p), l) for p, l in f.samples) == [("root.jpg", -1), ("x.JPEG", 1), ("y.png", 0)]
    with pytest.raises(DataError, match="data folder '.*nope' does not exist"):
        ImageFolder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data folder '.*empty' holds no") as e:
        ImageFolder(str(tmp_path / "empty"))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        build_train_loader(small_cfg(str(tmp_path / "nope")), 2)


def test_image_source_list_and_tar_shards(demo, tmp_path):
    folder = ImageSource(demo)
    names = [folder.name(i) for i in range(len(folder))]
    lst = tmp_path / "files.txt"
    lst.write_text("".join(f"{os.path.relpath(n, tmp_path)} {folder.labels[i]}\n" for i, n in enumerate(names)))
    from_list = ImageSource(str(lst))
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in range(2):
        with tarfile.open(shard_dir / f"shard-{s}.tar", "w") as tf:
            for i in range(s, len(names), 2):
                key = f"sample{i:04d}"
                tf.add(names[i], arcname=key + ".jpg")
                cls = str(folder.labels[i]).encode()
                info = tarfile.TarInfo(key + ".cls")
                info.size = len(cls)
                tf.addfile(info, io.BytesIO(cls))
    shards = ImageSource(str(shard_dir))
    glob_shards = ImageSource(str(shard_dir / "shard-*.tar"))
    assert len(from_list) == len(shards) == len(glob_shards) == len(folder) == 48
    by_bytes = {folder.read(i): folder.labels[i] for i in range(len(folder))}
    for src in (from_list, shards):
        got = {src.read(i): src.labels[i] for i in range(len(src))}
        assert got == by_bytes
    with pytest.raises(DataError, match="match no file"):
        ImageSource(str(tmp_path / "none-*.tar"))


def test_header_check(demo):
    src = ImageSource(demo)
    data = src.read(0)
    assert image_size_from_header(data) == (40, 40)
    buf = io.BytesIO()
    Image.new("RGB", (7, 5)).save(buf, "PNG")
    assert image_size_from_header(buf.getvalue()) == (7, 5)
    for bad in (data[: len(data) // 2], b"garbage" * 10, b""):
        with pytest.raises(ValueError):
            image_size_from_header(bad)


def test_demo_dataset_deterministic_atomic_and_skipped(tmp_path, demo):
    a = generate_demo_dataset(str(tmp_path / "a"), 9, 3, 24, seed=5)
    b = generate_demo_dataset(str(tmp_path / "b"), 9, 3, 24, seed=5)
    fa, fb = ImageFolder(a), ImageFolder(b)
    assert fa.classes == ["class_00", "class_01", "class_02"] and len(fa) == 9
    assert [open(p, "rb").read() for p, _ in fa.samples] == [open(p, "rb").read() for p, _ in fb.samples]
    assert os.path.basename(fa.samples[0][0]) == "img_00000.jpg"
    c = generate_demo_dataset(str(tmp_path / "c"), 9, 3, 24, seed=6)
    assert open(ImageFolder(c).samples[0][0], "rb").read() != open(fa.samples[0][0], "rb").read()
    mtime = os.path.getmtime(fa.samples[0][0])
    generate_demo_dataset(a, 9, 3, 24, seed=5)  # already complete: skipped
    assert os.path.getmtime(fa.samples[0][0]) == mtime
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    with pytest.raises(DataError, match="exists with 9 images"):
        generate_demo_dataset(a, 10, 3, 24)
    # images vary within a class (random position, scale, colours, noise): no two are equal
    pix = [np.asarray(Image.open(p), np.float32) for p, l in ImageFolder(demo).samples if l == 0]
    assert all(np.abs(pix[i] - pix[j]).mean() > 5 for i in range(len(pix)) for j in range(i))


# ----------------------------------------------------------------------------- random draws
def test_uniforms_pure_and_vectorized():
    u = uniforms(3, 7, np.arange(50)[:, None], np.arange(4)[None, :])
    assert u.shape == (50, 4, N_DRAWS) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(u[17, 2], uniforms(3, 7, 17, 2))
    assert not np.array_equal(uniforms(3, 7, 17, 2), uniforms(3, 8, 17, 2))
    assert not np.array_equal(uniforms(3, 7, 17, 2), uniforms(4, 7, 17, 2))
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003


def _rrc_loop(u, width, height, scale, ratio=RATIO):
    """torchvision RandomResizedCrop.get_params, written as the original loop, fed the same uniforms."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[2 * t + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_boxes_match_torchvision_algorithm_and_bounds(scale):
    rng = np.random.default_rng(0)
    n = 6000
    width = rng.integers(20, 600, n)
    height = np.where(rng.random(n) < 0.1, width * 5, rng.integers(20, 600, n))  # some extreme ratios
    u = uniforms(0, 0, np.arange(n), 0)
    boxes = resized_crop_boxes(u, width, height, scale)
    for i in range(0, n, 7):
        assert tuple(boxes[i]) == _rrc_loop(u[i], int(width[i]), int(height[i]), scale)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    normal = (width * 3 >= height) & (height * 3 >= width)  # not forced into the fallback
    frac = (h * w / (width * height))[normal]
    ar = (w / h)[normal]
    big = (width * height)[normal] > 10000  # rounding to integer pixels blurs the bounds of tiny images
    assert frac[big].min() >= scale[0] * 0.97 and frac[big].max() <= scale[1] * 1.03
    assert ar[big].min() >= RATIO[0] * 0.97 and ar[big].max() <= RATIO[1] * 1.03
    # log aspect ratio is uniform: its mean is ~0 and it spans the range
    assert abs(np.log(ar[big]).mean()) < 0.02 and np.log(ar[big]).std() > 0.15


def test_application_rates_and_ranges():
    specs = crop_specs(32, 16, 4)
    n = 4000
    u = uniforms(11, 2, np.arange(n)[:, None], np.arange(len(specs))[None, :])
    p = photometric_params(u, np.array([s.p_blur for s in specs]), np.array([s.p_solarize for s in specs]))
    for c, s in enumerate(specs):
        for key, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", s.p_blur), ("solarize", s.p_solarize)):
            hits = int(p[key][:, c].sum())
            assert binomial_ok(hits, n, rate), (c, key, hits / n, rate)
    for key, lo, hi in (("brightness", .6, 1.4), ("contrast", .6, 1.4), ("saturation", .8, 1.2), ("hue", -.1, .1),
                        ("sigma", .1, 2.0)):
        v = p[key]
        assert v.min() >= lo and v.max() <= hi and abs(v.mean() - (lo + hi) / 2) < 0.02 * (hi - lo), key
    perms, counts = np.unique(p["order"].reshape(-1, 4), axis=0, return_counts=True)
    assert len(perms) == 24 and all(binomial_ok(k, counts.sum(), 1 / 24) for k in counts)
    # crops of one image draw independently (not one shared draw)
    assert binomial_ok(int((p["flip"][:, 0] == p["flip"][:, 1]).sum()), n, 0.5)


# ----------------------------------------------------------------------------- photometric ops vs references
def test_adjust_hue_matches_colorsys():
    x = torch.rand(3, 3, 5, 7, dtype=torch.float64)
    x[0, :, 0, 0] = 0.3  # gray pixel (hue undefined: unchanged)
    x[1, 0, 1, 1] = x[1, 1, 1, 1]  # ties of the max
    shift = torch.tensor([0.07, -0.1, 0.0], dtype=torch.float64)
    y = adjust_hue(x, shift)
    for b in range(3):
        for i in range(5):
            for j in range(7):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                want = colorsys.hsv_to_rgb((h + shift[b].item()) % 1.0, s, v)
                assert torch.allclose(y[b, :, i, j], torch.tensor(want, dtype=torch.float64), atol=1e-9)


def test_gaussian_blur_matches_direct_convolution():
    x = torch.rand(3, 3, 11, 9, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.9, 2.0], dtype=torch.float64)
    y = gaussian_blur(x, sigma)
    for b in range(3):
        t = torch.arange(-6, 7, dtype=torch.float64)
        k1 = torch.exp(-t ** 2 / (2 * sigma[b] ** 2))
        k1 = k1 / k1.sum()
        pad = torch.nn.functional.pad(x[b:b + 1], (6, 6, 6, 6), mode="reflect")
        want = torch.nn.functional.conv2d(pad, (k1[:, None] * k1[None, :]).expand(3, 1, 13, 13).contiguous(), groups=3)
        assert torch.allclose(y[b], want[0], atol=1e-12)
    assert torch.allclose(gaussian_blur(x, torch.full((3,), 0.1, dtype=torch.float64)), x, atol=1e-10)


def test_photometric_matches_pil_reference(demo):
    """The batched ops from the same draws agree with the image-by-image PIL recipe (the official
    pipeline) up to PIL's uint8 rounding of every step and its box-approximated blur."""
    ref = DataAugmentationDINORef(local_crops_number=4, global_crop_size=48, local_crop_size=24)
    src = ImageSource(demo)
    diffs = []
    for idx in range(12):
        img = Image.open(io.BytesIO(src.read(idx))).convert("RGB")
        params = ref.params(img, 0, 3, idx)
        want = ref(img, params=params)
        for c, (s, p) in enumerate(zip(ref.specs, params)):
            x = pil_to_uint8(resized_crop_pil(img, p["box"], s.size, p["flip"]))[None]
            got = photometric(x, stack_params([p]))[0]
            diffs.append(((got - want[c]) * STD[0]).abs().mean().item())
    assert np.mean(diffs) < 0.01 and max(diffs) < 0.04, (np.mean(diffs), max(diffs))
    # every op alone, exactly (no PIL rounding): identity parameters leave the image unchanged
    x = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8)
    none = dict(jitter=torch.ones(4, dtype=torch.bool), brightness=torch.ones(4), contrast=torch.ones(4),
                saturation=torch.ones(4), hue=torch.zeros(4), order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]] * 2),
                gray=torch.zeros(4, dtype=torch.bool), blur=torch.zeros(4, dtype=torch.bool), sigma=torch.ones(4),
                solarize=torch.zeros(4, dtype=torch.bool))
    y = photometric(x, none) * STD + MEAN
    assert torch.allclose(y, x.float() / 255, atol=1e-5)
    solar = dict(none, jitter=torch.zeros(4, dtype=torch.bool), solarize=torch.tensor([True, False, True, False]))
    y = photometric(x, solar) * STD + MEAN
    xf = x.float() / 255
    want = torch.where((xf >= 128 / 255) & torch.tensor([True, False, True, False]).view(4, 1, 1, 1), 1 - xf, xf)
    assert torch.allclose(y, want, atol=1e-5)


# ----------------------------------------------------------------------------- the loader
def test_loader_shapes_dtypes_normalization(demo):
    for dtype in (torch.float32, torch.bfloat16):
        loader = build_train_loader(small_cfg(demo), 8, seed=0, dtype=dtype)
        assert loader.backend == "torch" and loader.num_images == 48 and loader.steps_per_epoch == 6
        crops = next(iter(loader.epoch(0)))
        assert [tuple(c.shape) for c in crops] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
        assert all(c.dtype == dtype and c.device.type == "cpu" for c in crops)
        for c in crops:
            pix = c.float() * STD + MEAN
            assert pix.min() >= -0.01 and pix.max() <= 1.01 and pix.std() > 0.05
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_train_loader(small_cfg(demo), 16, rank=0, world_size=4)


def test_observed_grayscale_rate(demo):
    """Rate of grayscale crops as seen in the pixels (R == G == B), not only in the draws."""
    loader = build_train_loader(small_cfg(demo, local_crops_number=8), 48, seed=3)
    crops = next(iter(loader.epoch(0)))
    locals_ = torch.cat(crops[2:]) * STD + MEAN
    gray = ((locals_[:, 0] - locals_[:, 1]).abs().amax((1, 2)) < 1e-5) & ((locals_[:, 1] - locals_[:, 2]).abs().amax((1, 2)) < 1e-5)
    assert binomial_ok(int(gray.sum()), gray.numel(), 0.2), gray.float().mean()


def test_sharding_covers_each_image_once_per_epoch():
    n, B, W = 103, 4, 3
    steps = n // (B * W)
    for epoch in (0, 1):
        seen = []
        for r in range(W):
            s = EpochBatches(n, B, r, W, seed=5)
            s.epoch = epoch
            seen += [i for batch in s for _, i in batch]
        assert len(seen) == steps * B * W == len(set(seen))
    one = EpochBatches(n, B * W, 0, 1, seed=5)
    rows = [i for batch in one for _, i in batch]
    assert rows == [i for g in range(steps) for r in range(W) for i in EpochBatches(n, B, r, W, 5).indices(0, g)]
    e0, e1 = EpochBatches(n, B, 0, 1, 5).indices(0, 0), EpochBatches(n, B, 0, 1, 5).indices(1, 0)
    assert not np.array_equal(e0, e1)  # reshuffled every epoch


def test_determinism_workers_resume_world_size_and_global_rng(demo):
    cfg = small_cfg(demo)
    state = torch.get_rng_state()
    single = list(build_train_loader(cfg, 8, seed=7).epoch(2))
    assert torch.equal(torch.get_rng_state(), state)  # the loader never touches torch's global RNG
    workers = list(build_train_loader(small_cfg(demo, num_workers=2), 8, seed=7).epoch(2, start_step=3))
    ranks = [list(build_train_loader(cfg, 4, rank=r, world_size=2, seed=7).epoch(2, start_step=1)) for r in range(2)]
    assert len(single) == 6 and len(workers) == 3 and len(ranks[0]) == 5
    for a, b in zip(single[3:], workers):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for step in range(1, 6):
        joined = [torch.cat([ranks[0][step - 1][c], ranks[1][step - 1][c]]) for c in range(5)]
        assert all(torch.equal(x, y) for x, y in zip(single[step], joined))
    other = next(iter(build_train_loader(cfg, 8, seed=8).epoch(2)))
    assert not torch.equal(other[0], single[0][0])
    again = next(iter(build_train_loader(cfg, 8, seed=7).epoch(3)))
    assert not torch.equal(again[0], single[0][0])


def test_ibot_masks_are_keyed_by_the_batch(demo):
    """With masking, each item is (crops, MaskBatch): the masks of the batch's sampler indices
    whatever the workers, resume position or rank split (the same rank-local B); crops unchanged."""
    from fastdino.data.masking import IBOTMasks

    masking = IBOTMasks(2)  # 32-px globals, patch 16
    plain = list(build_train_loader(small_cfg(demo), 8, seed=7).epoch(2))
    masked = list(build_train_loader(small_cfg(demo), 8, seed=7, masking=masking).epoch(2))
    workers = list(build_train_loader(small_cfg(demo, num_workers=2), 8, seed=7, masking=masking).epoch(2, start_step=3))
    sampler = EpochBatches(48, 8, 0, 1, 7)
    assert len(masked) == 6
    for step, ((crops, mb), ref_crops) in enumerate(zip(masked, plain)):
        assert all(torch.equal(x, y) for x, y in zip(crops, ref_crops))
        expected = masking(7, 2, sampler.indices(2, step))
        for name in ("masks", "mask_indices", "mask_weights", "n_masked"):
            assert torch.equal(getattr(mb, name), getattr(expected, name)), (step, name)
        assert mb.masks.shape == (16, 4) and mb.upper_bound == masking.upper_bound(8)
    assert any(int(mb.n_masked) > 0 for _, mb in masked)
    for (_, a), (_, b) in zip(masked[3:], workers):
        assert torch.equal(a.masks, b.masks) and torch.equal(a.mask_indices, b.mask_indices)


def test_epoch_length_zero_is_a_pass(demo):
    """data.epoch_length=0 (the default): epoch e is pass e, its global batches the consecutive slices
    of permutation(seed, e, n); an epoch_length equal to the pass length gives the same batches, bit for bit."""
    from fastdino.data.augment import permutation

    n, B, W = 103, 4, 3
    for r in range(W):
        s = EpochBatches(n, B, r, W, seed=5)
        assert s.steps_per_epoch == s.steps_per_pass == 8
        for epoch in (0, 3):
            s.epoch = epoch
            perm = permutation(5, epoch, n)
            assert [b for b in s] == [[(epoch, int(i)) for i in perm[g * B * W + r * B:g * B * W + (r + 1) * B]]
                                      for g in range(8)]
    passes = build_train_loader(small_cfg(demo), 8, seed=7)
    same = build_train_loader(small_cfg(demo, epoch_length=6), 8, seed=7)
    assert passes.steps_per_epoch == same.steps_per_epoch == 6
    for epoch in (0, 2):
        for a, b in zip(passes.epoch(epoch), same.epoch(epoch)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_epoch_length_runs_on_across_passes(demo):
    """data.epoch_length=L (DINOv2 / DINOv3's OFFICIAL_EPOCH_LENGTH): step s of epoch e is the global
    iteration e*L + s, the batch (indices, crops, iBOT masks) of step (e*L + s) % P of pass (e*L + s) // P
    exactly as the one-pass-per-epoch loader makes it; resume and the rank split keep that."""
    from fastdino.data.masking import IBOTMasks

    masking = IBOTMasks(2)
    passes = build_train_loader(small_cfg(demo), 20, seed=7, masking=masking)  # 48 images: P = 2 steps per pass
    assert passes.steps_per_epoch == 2
    by_pass = {(p, s): item for p in range(3) for s, item in enumerate(passes.epoch(p))}
    loader = build_train_loader(small_cfg(demo, epoch_length=3), 20, seed=7, masking=masking)
    assert loader.steps_per_epoch == 3 and loader.num_images == 48
    want = {0: [(0, 0), (0, 1), (1, 0)], 1: [(1, 1), (2, 0), (2, 1)]}
    one_pass = EpochBatches(48, 20, 0, 1, 7)
    for epoch, keys in want.items():
        assert [loader.sampler.position(epoch, s) for s in range(3)] == keys
        sampler = EpochBatches(48, 20, 0, 1, 7, epoch_length=3)
        sampler.epoch = epoch
        assert list(sampler) == [[(p, int(i)) for i in one_pass.indices(p, s)] for p, s in keys]
        got = list(loader.epoch(epoch))
        assert len(got) == 3
        for (crops, mb), key in zip(got, keys):
            ref_crops, ref_mb = by_pass[key]
            assert all(torch.equal(x, y) for x, y in zip(crops, ref_crops)), key
            assert torch.equal(mb.masks, ref_mb.masks) and torch.equal(mb.mask_indices, ref_mb.mask_indices), key
        for start in (1, 2, 3):  # resume at any step: the tail of the epoch
            tail = list(loader.epoch(epoch, start_step=start))
            assert len(tail) == 3 - start
            for (a, _), (b, _) in zip(tail, got[start:]):
                assert all(torch.equal(x, y) for x, y in zip(a, b))
    ranks = [build_train_loader(small_cfg(demo, epoch_length=3, num_workers=r), 10, rank=r, world_size=2, seed=7)
             for r in range(2)]
    parts = [list(r.epoch(1, start_step=1)) for r in ranks]
    assert len(parts[0]) == len(parts[1]) == 2
    for step, key in enumerate(want[1][1:]):
        rows = [ranks[r].sampler.indices(*key) for r in range(2)]
        assert np.array_equal(np.concatenate(rows), one_pass.indices(*key))
        joined = [torch.cat([parts[0][step][c], parts[1][step][c]]) for c in range(5)]
        assert all(torch.equal(x, y) for x, y in zip(joined, by_pass[key][0])), key
    with pytest.raises(ValueError, match="start_step 4 outside"):
        next(iter(loader.epoch(0, start_step=4)))


def test_corrupt_files_skipped_counted_or_raise(demo, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(demo, root)
    files = sorted(ImageFolder(str(root)).samples)
    data = open(files[0][0], "rb").read()
    open(files[0][0], "wb").write(data[: len(data) // 3])  # truncated JPEG
    open(files[5][0], "wb").write(b"not an image at all")
    loader = build_train_loader(small_cfg(str(root)), 8, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == 6 and loader.num_corrupt == 2
    assert all(tuple(b[0].shape) == (8, 3, 32, 32) and torch.isfinite(b[0]).all() for b in batches)
    again = list(loader.epoch(0))  # the replacement is deterministic
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again)) and loader.num_corrupt == 2
    for p, _ in files[: 30]:
        open(p, "wb").write(b"\xff\xd8garbage")
    with pytest.raises(DataError, match=r"of 8 images of a batch are unreadable, e.g. '.*\.jpg'"):
        list(build_train_loader(small_cfg(str(root)), 8, seed=0).epoch(0))


def test_gram_teacher_crops_are_the_global_boxes_undistorted(demo):
    """data.gram_crop_size: two more crops after the locals, each the box and flip of its global crop
    resized to the Gram size, with no colour jitter, grayscale, blur or solarize (DINOv3's
    gram_teacher_no_distortions); the other crops are unchanged by turning them on."""
    plain = next(iter(build_train_loader(small_cfg(demo), 8, seed=5).epoch(1)))
    loader = build_train_loader(small_cfg(demo, gram_crop_size=64), 8, seed=5)
    crops = next(iter(loader.epoch(1)))
    assert [tuple(c.shape) for c in crops] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3 + [(8, 3, 64, 64)] * 2
    assert all(torch.equal(a, b) for a, b in zip(crops[:5], plain))
    ref = DataAugmentationDINORef(local_crops_number=3, global_crop_size=32, local_crop_size=16, gram_crop_size=64)
    src = ImageSource(demo)
    idx = loader.sampler.indices(1, 0)
    for j in range(2):
        spec = ref.specs[5 + j]
        assert spec.key == j and not spec.distort and spec.size == 64
        for b, i in enumerate(idx):
            img = Image.open(io.BytesIO(src.read(int(i)))).convert("RGB")
            params = ref.params(img, 5, 1, int(i))
            assert params[5 + j]["box"] == params[j]["box"] and params[5 + j]["flip"] == params[j]["flip"]
            want = (pil_to_uint8(resized_crop_pil(img, params[j]["box"], 64, params[j]["flip"])).float() / 255 - MEAN[0]) / STD[0]
            assert torch.allclose(crops[5 + j][b], want, atol=1e-5)  # normalization only
            assert torch.allclose(crops[5 + j][b], ref(img, params=params)[5 + j], atol=1e-5)
    # the distortions did act on the globals of this batch (so "undistorted" is a real difference)
    down = torch.nn.functional.interpolate(crops[5] * STD + MEAN, size=32, mode="area")
    assert ((crops[0] * STD + MEAN) - down).abs().mean() > 0.02
    with pytest.raises(Exception, match="gram_crop_size"):
        from fastdino.config import load_config

        load_config(None, ["data.gram_crop_size=160"])  # smaller than the 224 px globals


def test_crop_plan_draws_sets_by_probability_per_step():
    """data.crop_sets: step it takes set k with probability p_k / sum(p), a pure function of (seed, it)
    (a new CropPlan, as on another rank or after a resume, draws the same); one set is always set 0; the
    Gram-teacher crops only from gram_from on."""
    from fastdino.data.crop_plan import CropPlan, CropSet

    sets = [CropSet(32, 16, 64, 0.3), CropSet(48, 16, 96, 0.6), CropSet(48, 32, 96, 0.1)]
    plan = CropPlan(sets, n_local=2, seed=3, gram_from=100)
    draws = np.array([plan.set_index(it) for it in range(3000)])
    for k, p in enumerate((0.3, 0.6, 0.1)):
        assert binomial_ok(int((draws == k).sum()), 3000, p), (k, (draws == k).mean())
    assert [CropPlan(sets, 2, seed=3).set_index(it) for it in range(50)] == draws[:50].tolist()
    assert [CropPlan(sets, 2, seed=4).set_index(it) for it in range(50)] != draws[:50].tolist()
    assert plan.layout(99) == (draws[99], False) and plan.layout(100) == (draws[100], True)
    specs = plan.specs((1, True))
    assert [s.size for s in specs] == [48, 48, 16, 16, 96, 96]
    assert [s.size for s in plan.specs((2, False))] == [48, 48, 32, 32]
    single = CropPlan([CropSet(32, 16)], 2, seed=3)
    assert {single.set_index(it) for it in range(200)} == {0} and not single.multi_resolution
    with pytest.raises(ValueError, match="> 0"):
        CropPlan([CropSet(32, 16, 0, 0.0)], 2)


def test_multi_resolution_batches_are_each_sets_crops(demo):
    """With data.crop_sets each step's crops have its set's sizes and are exactly the crops a one-set
    loader of those sizes makes at that step (the same boxes and draws, only the output sizes change);
    the iBOT masks are on that set's patch grid; the rank split and resume keep it."""
    from fastdino.data.masking import IBOTMasks

    sets = [{"global": 32, "local": 16, "p": 0.5}, {"global": 48, "local": 32, "p": 0.5}]
    masking = IBOTMasks(2, patch_size=16)
    multi = build_train_loader(small_cfg(demo, crop_sets=sets, epoch_length=6), 8, seed=7, masking=masking)
    got = list(multi.epoch(1))
    layouts = [multi.plan.layout(6 + s) for s in range(6)]
    assert {k for k, _ in layouts} == {0, 1}  # both sets occur in these 6 steps (seed 7)
    one = {k: build_train_loader(small_cfg(demo, global_crop_size=s["global"], local_crop_size=s["local"], epoch_length=6),
                                 8, seed=7, masking=IBOTMasks(s["global"] // 16)) for k, s in enumerate(sets)}
    want = {k: list(loader.epoch(1)) for k, loader in one.items()}
    for step, ((crops, mb), (k, _)) in enumerate(zip(got, layouts)):
        assert [x.shape[-1] for x in crops] == [sets[k]["global"]] * 2 + [sets[k]["local"]] * 3
        ref_crops, ref_mb = want[k][step]
        assert all(torch.equal(x, y) for x, y in zip(crops, ref_crops)), step
        assert mb.masks.shape[1] == (sets[k]["global"] // 16) ** 2 and torch.equal(mb.masks, ref_mb.masks)
    tail = list(multi.epoch(1, start_step=4))
    assert all(torch.equal(x, y) for (a, _), (b, _) in zip(tail, got[4:]) for x, y in zip(a, b))
    ranks = [build_train_loader(small_cfg(demo, crop_sets=sets, epoch_length=6), 4, rank=r, world_size=2, seed=7)
             for r in range(2)]
    halves = [list(r.epoch(1)) for r in ranks]
    for step, (crops, _) in enumerate(got):
        assert all(torch.equal(torch.cat([halves[0][step][c], halves[1][step][c]]), crops[c]) for c in range(5))
    with pytest.raises(ValueError, match="patch_size"):
        build_train_loader(small_cfg(demo, crop_sets=sets), 8, seed=7, masking=IBOTMasks(2))


def test_gram_crops_start_at_their_epoch(demo):
    """gram_from_epoch: the batches of earlier epochs have no Gram-teacher crops (no time spent on them);
    from that epoch on they are the crops of a loader that always makes them."""
    late = build_train_loader(small_cfg(demo, gram_crop_size=64), 8, seed=5, gram_from_epoch=2)
    always = build_train_loader(small_cfg(demo, gram_crop_size=64), 8, seed=5)
    before = next(iter(late.epoch(1)))
    assert len(before) == 5 and all(torch.equal(a, b) for a, b in zip(before, next(iter(always.epoch(1)))))
    after = next(iter(late.epoch(2)))
    assert len(after) == 7 and all(torch.equal(a, b) for a, b in zip(after, next(iter(always.epoch(2)))))


def test_crop_sets_config_errors():
    """data.crop_sets is checked with one line naming the key: each set's keys and sizes, p > 0, the Gram
    size with (only with) Gram anchoring."""
    from fastdino.config import ConfigError, load_config

    ok = '[{"global": 224, "local": 96, "p": 1}, {"global": 448, "local": 112, "p": 2}]'
    assert len(load_config(None, [f"data.crop_sets={ok}"]).data.crop_sets) == 2
    cases = {
        '[{"global": 224, "local": 96}]': "keys global, local, p",
        '[{"global": 224, "local": 100, "p": 1}]': "multiple of model.patch_size",
        '[{"global": 224, "local": 96, "p": 0}]': "p must be a number > 0",
        '[{"global": 224, "local": 96, "gram": 448, "p": 1}]': "Gram anchoring is off",
        '{"global": 224}': "expected a list",
    }
    for value, what in cases.items():
        with pytest.raises(ConfigError, match="data.crop_sets") as e:
            load_config(None, [f"data.crop_sets={value}"])
        assert what in str(e.value) and "\n" not in str(e.value), (value, str(e.value))
    gram = ["gram.weight=1", '--data.crop_sets=[{"global": 224, "local": 96, "gram": 160, "p": 1}]']
    with pytest.raises(ConfigError, match="gram must be >= global"):
        load_config(None, [gram[0], gram[1][2:]])
    with pytest.raises(ConfigError, match="gram must be a multiple"):
        load_config(None, ["gram.weight=1", 'data.crop_sets=[{"global": 224, "local": 96, "p": 1}]'])


def test_horizontal_flips_switch(demo):
    """data.horizontal_flips=false (DINOv3's 7B recipe): no crop is flipped, in the per-crop draws and
    in the DALI host draws; the boxes and photometric draws are those of the flipping recipe."""
    from fastdino.data.augment import draw_params
    from fastdino.data.dali import host_params

    on, off = crop_specs(32, 16, 3), crop_specs(32, 16, 3, horizontal_flips=False)
    flips = [draw_params(0, 1, i, c, on[c], 40, 40)["flip"] for i in range(100) for c in range(5)]
    assert binomial_ok(sum(flips), len(flips), 0.5)
    for i in range(100):
        for c in range(5):
            a, b = draw_params(0, 1, i, c, on[c], 40, 40), draw_params(0, 1, i, c, off[c], 40, 40)
            assert not b["flip"] and a["box"] == b["box"] and a["sigma"] == b["sigma"] and a["gray"] == b["gray"]
    feed = host_params(off, 0, 1, np.arange(64), np.full(64, 40), np.full(64, 40))
    for c in range(5):  # an unflipped box: x bounds in order
        assert (feed[f"roi_start{c}"][:, 1] < feed[f"roi_end{c}"][:, 1]).all()
    loader = build_train_loader(small_cfg(demo, horizontal_flips=False), 8, seed=5)
    crops = next(iter(loader.epoch(1)))
    ref = DataAugmentationDINORef(local_crops_number=3, global_crop_size=32, local_crop_size=16)
    ref.specs = crop_specs(32, 16, 3, horizontal_flips=False)
    src = ImageSource(demo)
    i = int(loader.sampler.indices(1, 0)[0])
    img = Image.open(io.BytesIO(src.read(i))).convert("RGB")
    want = ref(img, 5, 1, i)
    for c in range(5):  # PIL's rounding and box blur vs the batched ops (as test_photometric_matches_pil_reference)
        assert ((crops[c][0] - want[c]) * STD[0]).abs().mean() < 0.01, c


@pytest.mark.interpreted
def test_fused_photometric_loader_equals_torch(demo):
    """data.photometric_impl=triton (kernels/photometric.py, interpreted on CPU here): the torch loader's
    crops equal those of the torch reference ops to float rounding (the op's bound, 1e-5 normalized, away
    from solarize's threshold), bf16 crops too; the same batch, the same draws."""
    from fastdino.data import resolve_photometric

    assert resolve_photometric("auto", torch.device("cpu")) == "torch"
    for dtype in (torch.float32, torch.bfloat16):
        ref = next(iter(build_train_loader(small_cfg(demo), 8, seed=3, dtype=dtype).epoch(1)))
        fused_loader = build_train_loader(small_cfg(demo, photometric_impl="triton"), 8, seed=3, dtype=dtype)
        assert fused_loader.photometric == "triton"
        fused = next(iter(fused_loader.epoch(1)))
        for a, b in zip(fused, ref):
            d = (a.float() - b.float()).abs()
            tol = 1e-5 if dtype == torch.float32 else 1e-5 + 2 ** -7 * b.float().abs().max().item()
            assert (d > tol).float().mean() < 1e-3, (dtype, d.max())  # solarize flips at its threshold only


def test_fused_photometric_without_cuda_is_one_line(monkeypatch):
    from fastdino.data import resolve_photometric

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(DataError, match="data.photometric_impl 'triton'") as e:
        resolve_photometric("triton", torch.device("cpu"))
    assert "\n" not in str(e.value)
    assert resolve_photometric("torch", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_interpreter_exits_with_a_loaders_workers_still_referenced(backend, tmp_path):
    """A run (or test) that raised keeps its loader's iterator referenced to the end. The persistent workers
    ignore SIGTERM (preemption is the main process's job), so multiprocessing's exit hook, which terminates
    and joins them, would wait forever: fastdino's own exit hook stops them first."""
    import subprocess
    import sys

    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"""
import sys; sys.path.insert(0, {root!r})
from fastdino.config import DataConfig
from fastdino.data import build_train_loader, generate_demo_dataset
d = generate_demo_dataset({str(tmp_path / 'd')!r}, num_images=24, num_classes=2, image_size=40, seed=2)
cfg = DataConfig(path=d, backend={backend!r}, num_workers=2, global_crop_size=32, local_crop_size=16,
                 local_crops_number=2)
loader = build_train_loader(cfg, 6, seed=4)
it = loader.epoch(0)
next(it)
KEPT = (loader, it)  # referenced at exit, never closed
print("exiting", flush=True)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "exiting" in res.stdout, res.stderr[-2000:]
