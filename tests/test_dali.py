"""DALI backend (CPU operators here, GPU operators when CUDA is present): same recipe, same draws
and same batch layout as the torch backend; determinism; bad files."""
import math
import re
import shutil

import pytest
import torch

pytest.importorskip("nvidia.dali")

from fastdino.config import DataConfig  # noqa: E402
from fastdino.data import DataError, ImageFolder, build_train_loader, generate_demo_dataset  # noqa: E402
from fastdino.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cfg(path, backend):
    return DataConfig(path=path, backend=backend, num_workers=2, global_crop_size=32, local_crop_size=16,
                      local_crops_number=6)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo_dataset(str(tmp_path_factory.mktemp("dali") / "d"), num_images=48, num_classes=3,
                                 image_size=40, seed=2)


@pytest.fixture(scope="module")
def epoch_dali(demo):
    loader = build_train_loader(cfg(demo, "dali"), 12, seed=4, device=DEVICE)
    assert loader.backend == "dali" and loader.steps_per_epoch == 4 and loader.num_images == 48
    return [[c.cpu() for c in crops] for crops in loader.epoch(1)]


def test_shapes_and_agreement_with_torch_backend(demo, epoch_dali):
    """Same keys -> same boxes and parameters: the two backends differ only by their bicubic
    resampling (DALI vs PIL), float rounding and, on a GPU, the JPEG decoder (nvJPEG's IDCT and chroma
    upsampling differ from libjpeg's: measured on an H100, mean 0.0048 and max 0.20 in [0, 1] pixels)."""
    mean_tol, max_tol = (0.01, 0.35) if DEVICE.type == "cuda" else (0.003, 0.1)
    torch_epoch = list(build_train_loader(cfg(demo, "torch"), 12, seed=4).epoch(1))
    assert len(epoch_dali) == len(torch_epoch) == 4
    for a, b in zip(epoch_dali, torch_epoch):
        assert [tuple(c.shape) for c in a] == [(12, 3, 32, 32)] * 2 + [(12, 3, 16, 16)] * 6
        assert all(c.dtype == torch.float32 for c in a)
        for x, y in zip(a, b):
            d = (x - y).abs() * STD
            assert d.mean() < mean_tol and d.max() < max_tol, (d.mean(), d.max())


def test_ibot_masks_equal_the_torch_backend(demo):
    """The iBOT masks come from the batch's dataset indices: DALI and torch give the same ones."""
    from fastdino.data.masking import IBOTMasks

    masking = IBOTMasks(2)
    dali = [mb for _, mb in build_train_loader(cfg(demo, "dali"), 12, seed=4, device=DEVICE, masking=masking).epoch(1)]
    ref = [mb for _, mb in build_train_loader(cfg(demo, "torch"), 12, seed=4, masking=masking).epoch(1)]
    assert len(dali) == len(ref) == 4
    for a, b in zip(dali, ref):
        for name in ("masks", "mask_indices", "mask_weights", "n_masked"):
            assert torch.equal(getattr(a, name).cpu(), getattr(b, name)), name


def test_observed_rates(epoch_dali):
    """Grayscale (R == G == B) and solarize-free statistics seen in DALI's pixels."""
    locs = torch.cat([c for crops in epoch_dali for c in crops[2:]]) * STD + MEAN
    gray = ((locs[:, 0] - locs[:, 1]).abs().amax((1, 2)) < 1e-4) & ((locs[:, 1] - locs[:, 2]).abs().amax((1, 2)) < 1e-4)
    n = gray.numel()
    assert abs(int(gray.sum()) - 0.2 * n) <= 4.5 * math.sqrt(n * 0.16), gray.float().mean()
    assert locs.min() >= -1e-4 and locs.max() <= 1 + 1e-4


def test_determinism_resume_world_size_dtype(demo, epoch_dali):
    ranks = [build_train_loader(cfg(demo, "dali"), 6, rank=r, world_size=2, seed=4, device=DEVICE,
                                dtype=torch.bfloat16) for r in range(2)]
    parts = [[[c.cpu() for c in crops] for crops in r.epoch(1, start_step=2)] for r in ranks]
    assert len(parts[0]) == 2
    for step in range(2):
        for c in range(8):
            joined = torch.cat([parts[0][step][c], parts[1][step][c]])
            assert joined.dtype == torch.bfloat16
            assert torch.equal(joined, epoch_dali[step + 2][c].to(torch.bfloat16))


def test_epoch_length_follows_the_torch_mapping(demo):
    """data.epoch_length=L: step s of epoch e is the batch of step (e*L + s) % P of pass (e*L + s) // P,
    the same indices as the torch backend's sampler and the same crops as the one-pass-per-epoch DALI
    loader; resume and the rank split keep that."""
    from fastdino.data.torch_loader import EpochBatches

    def with_length(length):
        c = cfg(demo, "dali")
        c.epoch_length, c.local_crops_number = length, 2
        return c

    passes = build_train_loader(with_length(0), 20, seed=4, device=DEVICE)  # 48 images: P = 2 steps per pass
    by_pass = {(p, s): [c.cpu() for c in crops] for p in (1, 2) for s, crops in enumerate(passes.epoch(p))}
    loader = build_train_loader(with_length(3), 20, seed=4, device=DEVICE)
    assert loader.steps_per_epoch == 3
    keys = [(1, 1), (2, 0), (2, 1)]  # epoch 1 = global iterations 3, 4, 5
    one_pass = EpochBatches(48, 20, 0, 1, 4)
    for s, key in enumerate(keys):
        assert loader._host_batch(1, s)["indices"] == one_pass.indices(*key).tolist()
    got = [[c.cpu() for c in crops] for crops in loader.epoch(1)]
    assert len(got) == 3
    for crops, key in zip(got, keys):
        assert all(torch.equal(x, y) for x, y in zip(crops, by_pass[key])), key
    ranks = [build_train_loader(with_length(3), 10, rank=r, world_size=2, seed=4, device=DEVICE) for r in range(2)]
    parts = [[[c.cpu() for c in crops] for crops in r.epoch(1, start_step=1)] for r in ranks]
    assert len(parts[0]) == len(parts[1]) == 2
    for step, key in enumerate(keys[1:]):
        joined = [torch.cat([parts[0][step][c], parts[1][step][c]]) for c in range(4)]
        assert all(torch.equal(x, y) for x, y in zip(joined, by_pass[key])), key
    for x in [passes, loader] + ranks:
        x.close()


def test_bad_files_skipped_and_counted(demo, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(demo, root)
    files = sorted(p for p, _ in ImageFolder(str(root)).samples)
    data = open(files[0], "rb").read()
    open(files[0], "wb").write(data[: len(data) // 2])  # truncated: caught by the header check
    garbled = bytearray(data)  # SOI, frame header and EOI intact, so it passes the header check, but
    dht = garbled.index(b"\xff\xc4")  # the first Huffman table's 16 code counts are bogus: the decoder fails
    garbled[dht + 5:dht + 21] = b"\xff" * 16
    open(files[7], "wb").write(bytes(garbled))
    loader = build_train_loader(cfg(str(root), "dali"), 12, seed=4, device=DEVICE)
    batches = list(loader.epoch(1))
    assert len(batches) == 4 and all(torch.isfinite(b[0]).all() for b in batches)
    # the CPU decoder rejects the garbled file (found by PIL, pipeline rebuilt); nvJPEG may decode it
    assert loader.num_corrupt == 2 if DEVICE.type == "cpu" else loader.num_corrupt in (1, 2)
    for p in files[:30]:
        open(p, "wb").write(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=r"of 12 images of a batch are unreadable, e.g. '.*\.jpg'"):
        list(build_train_loader(cfg(str(root), "dali"), 12, seed=4, device=DEVICE).epoch(1))


def test_one_pipeline_reused_across_epochs_and_released(demo, epoch_dali):
    """epoch() many times (early exits with batches in flight included) reuses one DALI pipeline,
    gives the same crops as a full epoch, and close() releases it."""
    import gc

    from nvidia.dali import Pipeline

    def live():
        gc.collect()
        return sum(issubclass(type(o), Pipeline) for o in gc.get_objects())

    before = live()
    loader = build_train_loader(cfg(demo, "dali"), 12, seed=4, device=DEVICE)
    # fresh pipeline fed a single batch (fills its prefetch with a duplicate, dropped)
    only = [[c.cpu() for c in crops] for crops in loader.epoch(1, start_step=3)]
    assert len(only) == 1 and all(torch.equal(a, b) for a, b in zip(only[0], epoch_dali[3]))
    for e in range(5):
        it = loader.epoch(1, start_step=e % 2)
        first = [c.cpu() for c in next(it)]
        it.close()  # leaves an epoch with the next batch in flight
        assert all(torch.equal(a, b) for a, b in zip(first, epoch_dali[e % 2]))
    last = [[c.cpu() for c in crops] for crops in loader.epoch(1, start_step=3)]
    assert len(last) == 1 and all(torch.equal(a, b) for a, b in zip(last[0], epoch_dali[3]))
    assert loader._pipes_built == 1 and live() - before == 1
    loader.close()
    assert not loader._pipes and live() == before


def test_gram_teacher_crops_equal_the_torch_backend(demo):
    """The Gram-teacher crops (data.gram_crop_size): the global crops' draws, undistorted, as the torch backend."""
    c = cfg(demo, "dali")
    c.gram_crop_size, c.local_crops_number = 48, 2
    dali = next(iter(build_train_loader(c, 12, seed=4, device=DEVICE).epoch(0)))
    t = cfg(demo, "torch")
    t.gram_crop_size, t.local_crops_number = 48, 2
    ref = next(iter(build_train_loader(t, 12, seed=4).epoch(0)))
    assert [tuple(x.shape) for x in dali] == [(12, 3, 32, 32)] * 2 + [(12, 3, 16, 16)] * 2 + [(12, 3, 48, 48)] * 2
    mean_tol, max_tol = (0.01, 0.35) if DEVICE.type == "cuda" else (0.003, 0.1)
    for x, y in zip(dali, ref):
        d = (x.cpu() - y).abs() * STD
        assert d.mean() < mean_tol and d.max() < max_tol, (d.mean(), d.max())


def test_gram_crops_from_their_epoch(demo):
    """gram_from_epoch: DALI makes the Gram-teacher crops from that epoch on (a pipeline built for the new
    layout, the old one dropped), as the torch backend."""
    c = cfg(demo, "dali")
    c.gram_crop_size, c.local_crops_number = 48, 2
    loader = build_train_loader(c, 12, seed=4, device=DEVICE, gram_from_epoch=1)
    before, after = next(iter(loader.epoch(0))), next(iter(loader.epoch(1)))
    assert len(before) == 4 and len(after) == 6 and loader._pipes_built == 2
    t = cfg(demo, "torch")
    t.gram_crop_size, t.local_crops_number = 48, 2
    ref = next(iter(build_train_loader(t, 12, seed=4).epoch(1)))
    for x, y in zip(after, ref):
        assert ((x.cpu() - y).abs() * STD).mean() < (0.01 if DEVICE.type == "cuda" else 0.003)
    assert list(loader._pipes) == [(0, True)]  # the layout before the Gram start is dropped
    loader.close()


def test_crop_sets_one_pipeline_each_and_the_torch_backends_crops(demo):
    """data.crop_sets on DALI: each step's crops have its set's sizes and are the torch backend's crops of that
    step (the same boxes and draws; the two backends differ by their bicubic resampler only); one pipeline per
    set, built on first use and reused; the iBOT masks on the set's patch grid equal the torch backend's; resume
    mid-epoch and an epoch left early keep the order (each pipeline's outputs are taken in step order)."""
    from fastdino.data.masking import IBOTMasks

    sets = [{"global": 32, "local": 16, "p": 0.5}, {"global": 48, "local": 32, "p": 0.5}]

    def loader(backend):
        c = cfg(demo, backend)
        c.crop_sets, c.local_crops_number, c.epoch_length = sets, 2, 6
        return build_train_loader(c, 8, seed=7, device=DEVICE if backend == "dali" else None,
                                  masking=IBOTMasks(2, patch_size=16))

    dali, torch_ = loader("dali"), loader("torch")
    got, want = list(dali.epoch(1)), list(torch_.epoch(1))
    layouts = [dali.plan.layout(6 + s) for s in range(6)]  # epoch 1 = global iterations 6..11
    assert {k for k, _ in layouts} == {0, 1} and len(got) == len(want) == 6  # both sets occur (seed 7)
    assert len(dali._pipes) == dali._pipes_built == 2
    mean_tol = 0.01 if DEVICE.type == "cuda" else 0.003
    for step, ((crops, mb), (ref, ref_mb), (k, _)) in enumerate(zip(got, want, layouts)):
        assert [x.shape[-1] for x in crops] == [sets[k]["global"]] * 2 + [sets[k]["local"]] * 2, step
        assert all(((x.cpu() - y).abs() * STD).mean() < mean_tol for x, y in zip(crops, ref)), step
        assert mb.masks.shape[1] == (sets[k]["global"] // 16) ** 2 and torch.equal(mb.masks.cpu(), ref_mb.masks)
    tail = list(dali.epoch(1, start_step=3))
    assert all(torch.equal(x.cpu(), y.cpu()) for (a, _), (b, _) in zip(tail, got[3:]) for x, y in zip(a, b))
    it = dali.epoch(1)
    next(it)
    it.close()  # left with batches of both pipelines in flight
    again = list(dali.epoch(1))
    assert all(torch.equal(x.cpu(), y.cpu()) for (a, _), (b, _) in zip(again, got) for x, y in zip(a, b))
    assert dali._pipes_built == 2
    dali.close()


def test_host_workers_make_the_batches_of_the_in_process_host(demo, tmp_path, caplog):
    """data.num_workers > 0: worker processes make the host side (reads, header checks, draws); the crops,
    the unreadable-file counts and names equal those of the in-process host (num_workers 0). A file only the
    training process knows as undecodable (found by DALI's decoder in epoch 1) is not in the workers' snapshot:
    its batches are made again in the training process, so epoch 2 needs no second pipeline rebuild."""
    root = tmp_path / "bad"
    shutil.copytree(demo, root)
    files = sorted(p for p, _ in ImageFolder(str(root)).samples)
    data = open(files[0], "rb").read()
    open(files[0], "wb").write(data[: len(data) // 2])  # fails the header check (in the worker)
    garbled = bytearray(data)  # passes the header check, fails in DALI's CPU decoder
    dht = garbled.index(b"\xff\xc4")
    garbled[dht + 5:dht + 21] = b"\xff" * 16
    open(files[7], "wb").write(bytes(garbled))

    def run(workers):
        c = cfg(str(root), "dali")
        c.num_workers = workers
        loader = build_train_loader(c, 12, seed=4, device=DEVICE)
        epochs = [[[x.cpu() for x in crops] for crops in loader.epoch(e)] for e in (1, 2)]
        return loader, epochs

    caplog.set_level("WARNING", logger="fastdino")
    threads, want = run(0)
    caplog.clear()
    workers, got = run(2)
    assert workers.host_workers == 2 and threads.host_workers == 0
    for a, b in zip(want, got):
        assert len(a) == len(b) == 4
        assert all(torch.equal(x, y) for crops_a, crops_b in zip(a, b) for x, y in zip(crops_a, crops_b))
    named = [r.getMessage() for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    if DEVICE.type == "cpu":
        assert workers.num_corrupt == threads.num_corrupt == 2
        assert workers._decoder_bad == {7} and workers._pipes_built == 2  # built, rebuilt once in epoch 1 only
        assert sorted(n.split("'")[1] for n in named) == [files[0], files[7]]  # each named once
    assert workers.timing["batches"] == threads.timing["batches"] >= 8 and workers.timing["host_read_s"] > 0
    worker_host = workers._workers.dataset  # the workers' copy: serial reads, its own cache of bad files
    assert worker_host.read_threads == 1 and worker_host.bad is not workers._bad
    procs = list(workers._workers._iterator._workers)
    assert len(procs) == 2 and all(p.is_alive() for p in procs)
    workers.close()
    threads.close()
    for p in procs:
        p.join(timeout=30)
    assert workers._workers is None and not any(p.is_alive() for p in procs)


def test_host_worker_errors_are_one_line(demo, tmp_path):
    """A batch a worker process cannot make (more than half of its files unreadable) is one DataError line
    naming a file in the training process, not a worker traceback."""
    root = tmp_path / "bad"
    shutil.copytree(demo, root)
    for p in sorted(p for p, _ in ImageFolder(str(root)).samples)[:30]:
        open(p, "wb").write(b"\xff\xd8 not a jpeg")
    loader = build_train_loader(cfg(str(root), "dali"), 12, seed=4, device=DEVICE)
    assert loader.host_workers == 2
    with pytest.raises(DataError) as e:
        list(loader.epoch(1))
    assert "\n" not in str(e.value) and re.search(r"of 12 images of a batch are unreadable, e.g. '.*\.jpg'",
                                                   str(e.value)), str(e.value)
    loader.close()
