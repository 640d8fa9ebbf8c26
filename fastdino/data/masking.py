"""iBOT masks for the global crops (DINOv2 recipe): block-wise masks and their static-shaped batch assembly.

Semantics (official DINOv2: data/masking.py MaskingGenerator, data/collate.py collate_data_and_cast,
train.py builds MaskingGenerator(grid, max_num_patches=0.5*H*W); config mask_sample_probability 0.5,
mask_ratio_min_max [0.1, 0.5]):

Block mask of one crop, target n patches on an (H, W) patch grid. While fewer than n are masked,
place one block with room r = min(n - masked, max_num_patches): up to 10 tries of
    area ~ U(min_num_patches, r)   (r < min_num_patches reverses the interval, as random.uniform does)
    aspect = exp(U(log min_aspect, log max_aspect)),  h = round(sqrt(area*aspect)), w = round(sqrt(area/aspect))
    if h < H and w < W (strict): top ~ U{0..H-h}, left ~ U{0..W-w}; the try succeeds when the block
    adds k new patches with 0 < k <= r, and then they are masked.
The first success ends the round; a round with no success ends the mask (it may stay below n).
So a mask never exceeds its target.

Batch (the official collate runs per rank on the rank's B images, S = 2B global-crop samples,
crop-major: sample c*B + b is global crop c of image b): n_masked = int(S * mask_probability)
samples get a mask; their ratios are stratified, sample k of them takes a target of
int(N * U(p_k, p_k+1)) patches with p = linspace(min, max, n_masked + 1) (float32, as torch), the
others get none, and the masks are shuffled over the S samples. upper_bound = sum_k int(N * p_k+1)
bounds the masked tokens of the batch; masks_weight = 1 / (masked tokens of the token's sample).

Determinism. Every random number is a counter-hashed draw of fastdino.data.augment.uniforms, under
crop ids that the augmentations never use:
    uniforms(seed, epoch, index, MASK_KEY - (c << 32) - 0, 2)    slot 0: shuffle priority, slot 1: ratio
    uniforms(seed, epoch, index, MASK_KEY - (c << 32) - t, 40)   block round t >= 1: try j uses slots
                                                                 4j..4j+3 = (area, log-aspect, top, left)
where index is the image's dataset index as the sampler gives it and c its global crop number. The
shuffle is "order the group's samples by their priority" (i.i.d. uniform priorities rank into a
uniformly random permutation, as random.shuffle gives), so it depends on the set of samples, not on
their order. A mask therefore depends only on (seed, epoch, the dataset indices of its stratification
group) - never on rank, world size, workers, resume position or any global RNG - and the DALI and torch
loaders, which share the sampler, get the same masks.

Stratification group. The official rule stratifies over the rank-local batch. Here the group is
`group_size` images (default: the whole rank-local batch, i.e. exactly the official rule). The samplers
hand rank r of global batch g the positions B*(g*W + r) .. +B of the epoch permutation: the rank
batches are the consecutive B-chunks of the permutation whatever the world size, so with the default
the masks do not change with the world size as long as the per-rank batch B does. Pin group_size to a
divisor of every per-rank batch you will use (e.g. 16) to keep the masks identical when the global
batch is re-split with another per-rank B; each group then follows the official rule with B = group_size
(the same marginal law per sample when 2 * group_size * mask_probability is an integer; the bound is the
sum of the groups' bounds, a bit larger than one batch-wide bound).

Cost (host, numpy, vectorized over the samples: all masks advance one block per round, each round one
hash of 40 draws per sample, a summed-area table and the 10 tries at once; a mask takes about 5
blocks on average and at most ~12 at 16x16): B=64 (128 samples), 16x16 grid, default recipe: about
2 ms per batch on one CPU core (tests/test_masking.py::test_cost_b64_16x16 prints it), small beside
decoding and cropping the batch. Call it where the batch's indices are known (a loader worker or
the main process) with the sampler's indices (not the replacements of unreadable files: the masks
do not look at pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastdino.data.augment import uniforms

MASK_KEY = -(1 << 48)  # crop ids of the mask draws: far from the augmentations' 0..n_crops-1 and -1..-18
N_TRIES = 10
SLOTS_PER_TRY = 4  # area, log-aspect, top, left


def _crop_id(crop, t):
    return MASK_KEY - (np.asarray(crop, np.int64) << 32) - np.int64(t)


def _grid(grid) -> tuple[int, int]:
    H, W = (grid, grid) if isinstance(grid, (int, np.integer)) else tuple(grid)
    if int(H) != H or int(W) != W or H < 2 or W < 2:
        raise ValueError(f"masking: grid {grid!r} must be (H, W) integers >= 2 (blocks must be strictly "
                         f"smaller than the grid, as in the official generator)")
    return int(H), int(W)


class MaskingGenerator:
    """Block-wise masks on an (H, W) patch grid, the official generator's law with keyed draws.

    grid: int or (H, W). max_num_patches: largest block (default 0.5*H*W, what the official training
    passes when the crop size is a multiple of the patch size). max_aspect: default 1/min_aspect.
    Call with per-sample targets and keys (broadcast together):
        gen(num_masking_patches, seed, epoch, index, crop) -> bool (H, W), or (S, H, W) for arrays (S,)."""

    def __init__(self, grid, min_num_patches: float = 4, max_num_patches: float | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = _grid(grid)
        self.num_patches = self.height * self.width
        self.min_num_patches = float(min_num_patches)
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else float(max_num_patches)
        if not self.min_num_patches >= 0 or not self.max_num_patches > 0:
            raise ValueError(f"MaskingGenerator: need min_num_patches >= 0 and max_num_patches > 0, got "
                             f"{min_num_patches} and {max_num_patches}")
        if not min_aspect > 0 or not (max_aspect is None or max_aspect >= min_aspect):
            raise ValueError(f"MaskingGenerator: need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"MaskingGenerator(grid=({self.height}, {self.width}), min_num_patches={self.min_num_patches:g}, "
                f"max_num_patches={self.max_num_patches:g}, aspect=[{math.exp(self.log_aspect[0]):.3g}, "
                f"{math.exp(self.log_aspect[1]):.3g}])")

    def __call__(self, num_masking_patches, seed: int, epoch: int, index, crop) -> np.ndarray:
        return self.generate(num_masking_patches, seed, epoch, index, crop)[0]

    def _proposals(self, u: np.ndarray, room: np.ndarray):
        """Blocks of the 10 tries from u [n, 10, 4] and room [n]: (top, left, h, w, fits), each [n, 10]."""
        H, W = self.height, self.width
        area = self.min_num_patches + (room[:, None] - self.min_num_patches) * u[..., 0]
        aspect = np.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * u[..., 1])
        h = np.round(np.sqrt(area * aspect)).astype(np.int64)  # half to even, as Python's round
        w = np.round(np.sqrt(area / aspect)).astype(np.int64)
        fits = (h < H) & (w < W)
        h, w = np.where(fits, h, 0), np.where(fits, w, 0)
        top = np.floor(u[..., 2] * (H - h + 1)).astype(np.int64)  # random.randint(0, H - h)
        left = np.floor(u[..., 3] * (W - w + 1)).astype(np.int64)
        return top, left, h, w, fits

    def generate(self, num_masking_patches, seed: int, epoch: int, index, crop):
        """(masks bool [..., H, W], boxes int64 [..., rounds, 4] = (top, left, h, w) of the placed
        blocks in order, h = 0 after the last one). Vectorized: all samples advance one block per round."""
        n = np.asarray(num_masking_patches, np.int64)
        shape = np.broadcast_shapes(n.shape, np.shape(index), np.shape(crop))
        n = np.broadcast_to(n, shape).reshape(-1)
        index = np.broadcast_to(np.asarray(index, np.int64), shape).reshape(-1)
        crop = np.broadcast_to(np.asarray(crop, np.int64), shape).reshape(-1)
        S, H, W = n.size, self.height, self.width
        mask = np.zeros((S, H, W), bool)
        count = np.zeros(S, np.int64)
        active = np.flatnonzero(n > 0)
        rows, cols = np.arange(H)[:, None], np.arange(W)[None, :]
        boxes = []
        t = 0
        while active.size:
            t += 1
            room = np.minimum(n[active] - count[active], self.max_num_patches).astype(np.float64)
            u = uniforms(seed, epoch, index[active], _crop_id(crop[active], t), N_TRIES * SLOTS_PER_TRY)
            top, left, h, w, fits = self._proposals(u.reshape(-1, N_TRIES, SLOTS_PER_TRY), room)
            # patches already masked inside each proposal, from a summed-area table of the current masks
            sat = np.zeros((active.size, H + 1, W + 1), np.int64)
            sat[:, 1:, 1:] = mask[active].cumsum(1).cumsum(2)
            i = np.arange(active.size)[:, None]
            inside = sat[i, top + h, left + w] - sat[i, top, left + w] - sat[i, top + h, left] + sat[i, top, left]
            new = h * w - inside
            ok = fits & (new > 0) & (new <= room[:, None])
            found = ok.any(1)
            j = np.argmax(ok, 1)[:, None]  # the first successful try wins
            tk, lk, hk, wk, nk = (np.take_along_axis(a, j, 1)[:, 0] for a in (top, left, h, w, new))
            block = ((rows >= tk[:, None, None]) & (rows < (tk + hk)[:, None, None])
                     & (cols >= lk[:, None, None]) & (cols < (lk + wk)[:, None, None]) & found[:, None, None])
            mask[active] |= block
            count[active] += np.where(found, nk, 0)
            box = np.zeros((S, 4), np.int64)
            box[active] = np.where(found[:, None], np.stack([tk, lk, hk, wk], 1), 0)
            boxes.append(box)
            active = active[found & (count[active] < n[active])]
        boxes = np.stack(boxes, 1) if boxes else np.zeros((S, 0, 4), np.int64)
        return mask.reshape(shape + (H, W)), boxes.reshape(shape + boxes.shape[1:])


def block_mask_ref(gen: MaskingGenerator, num_masking_patches: int, seed: int, epoch: int, index: int,
                   crop: int) -> tuple[np.ndarray, list]:
    """One mask, the official loop written plainly with the same keyed draws: (mask bool [H, W],
    list of placed blocks (top, left, h, w)). The reference of MaskingGenerator.generate."""
    H, W = gen.height, gen.width
    mask = np.zeros((H, W), bool)
    count, t, boxes = 0, 0, []
    while count < num_masking_patches:
        t += 1
        room = min(num_masking_patches - count, gen.max_num_patches)
        u = uniforms(seed, epoch, index, int(_crop_id(crop, t)), N_TRIES * SLOTS_PER_TRY)
        delta = 0
        for j in range(N_TRIES):
            u_area, u_aspect, u_top, u_left = (float(v) for v in u[SLOTS_PER_TRY * j:SLOTS_PER_TRY * (j + 1)])
            area = gen.min_num_patches + (room - gen.min_num_patches) * u_area
            aspect = math.exp(gen.log_aspect[0] + (gen.log_aspect[1] - gen.log_aspect[0]) * u_aspect)
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < H and w < W:
                top, left = int(u_top * (H - h + 1)), int(u_left * (W - w + 1))
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= room:
                    mask[top:top + h, left:left + w] = True
                    delta = new
                    boxes.append((top, left, h, w))
                    break
        if delta == 0:
            break
        count += delta
    return mask, boxes


@dataclass
class MaskBatch:
    """iBOT masks of one rank-local batch, static-shaped (CPU tensors; move them with the crops).

    masks        (n_global*B, H*W) bool, crop-major (row c*B + b: global crop c of image b)
    mask_indices (upper_bound,) int64: flat indices into the (n_global*B*H*W) patch tokens of the
                 masked tokens, ascending (the official mask_indices_list), then padding = 0
    mask_weights (upper_bound,) float32: 1 / (masked tokens of that token's sample) (the official
                 masks_weight); 0 on padding. They sum to the number of samples with a mask.
    n_masked     () int64: real entries of mask_indices

    Consumers keep static shapes: gather upper_bound tokens with mask_indices, weight the per-token
    cross-entropy with mask_weights and divide by n_global*B (the official iBOT loss); statistics
    that must not see padding (center, Sinkhorn-Knopp sums) use arange(upper_bound) < n_masked."""
    masks: torch.Tensor
    mask_indices: torch.Tensor
    mask_weights: torch.Tensor
    n_masked: torch.Tensor

    @property
    def upper_bound(self) -> int:
        return self.mask_indices.numel()

    def to(self, device, non_blocking: bool = False) -> "MaskBatch":
        return MaskBatch(*(t.to(device, non_blocking=non_blocking) for t in
                           (self.masks, self.mask_indices, self.mask_weights, self.n_masked)))


class IBOTMasks:
    """The DINOv2 collate's masks for a rank-local batch, keyed and static-shaped.

        masking = IBOTMasks(grid=16)                     # 224-px crops, patch 14
        mb = masking(seed, epoch, indices)               # indices: the rank batch's dataset indices (B,)
        masking.upper_bound(B)                           # == mb.upper_bound, fixed for given B

    mask_probability: fraction of the n_global*group samples of a group that get a mask (int() of the
    product, as official); mask_ratio: (min, max) of the masked fraction, stratified over them.
    group_size: images per stratification group (default: the whole call batch = the official rule;
    see the module docstring). patch_size: the model's, for for_crop_size (crops of other sizes:
    data.crop_sets). The other arguments go to MaskingGenerator."""

    def __init__(self, grid, mask_probability: float = 0.5, mask_ratio=(0.1, 0.5), n_global_crops: int = 2,
                 group_size: int | None = None, min_num_patches: float = 4, max_num_patches: float | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None, patch_size: int | None = None):
        self.generator = MaskingGenerator(grid, min_num_patches, max_num_patches, min_aspect, max_aspect)
        self._args = dict(mask_probability=mask_probability, mask_ratio=mask_ratio, n_global_crops=n_global_crops,
                          group_size=group_size, min_num_patches=min_num_patches, max_num_patches=max_num_patches,
                          min_aspect=min_aspect, max_aspect=max_aspect)  # for_crop_size's copies
        self.patch_size = patch_size
        self._other_grids: dict = {}
        lo, hi = (float(v) for v in mask_ratio)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"IBOTMasks: mask_ratio {tuple(mask_ratio)} must satisfy 0 <= min <= max <= 1")
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"IBOTMasks: mask_probability {mask_probability} must be in [0, 1]")
        if int(n_global_crops) != n_global_crops or n_global_crops < 1:
            raise ValueError(f"IBOTMasks: n_global_crops {n_global_crops} must be an integer >= 1")
        if group_size is not None and (int(group_size) != group_size or group_size < 1):
            raise ValueError(f"IBOTMasks: group_size {group_size} must be an integer >= 1 (or None: the whole batch)")
        self.mask_ratio, self.mask_probability = (lo, hi), float(mask_probability)
        self.n_global_crops = int(n_global_crops)
        self.group_size = None if group_size is None else int(group_size)
        self._strata = {}

    def for_crop_size(self, size: int) -> "IBOTMasks":
        """The same masking on the patch grid of global crops of `size` px (size // patch_size; self when
        that is this grid). Its maximal block is 0.5 x the grid's patches, as the official training builds
        MaskingGenerator for each crop size (unless an explicit max_num_patches was given)."""
        if self.patch_size is None:
            return self
        grid = int(size) // self.patch_size
        if (grid, grid) == (self.generator.height, self.generator.width):
            return self
        if grid not in self._other_grids:
            self._other_grids[grid] = IBOTMasks(grid, **self._args, patch_size=self.patch_size)
        return self._other_grids[grid]

    def strata(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """Stratum bounds of a group of `group` images: float32 (lo, hi) [n_masked] with
        n_masked = int(n_global*group*mask_probability), lo/hi consecutive points of
        torch.linspace(min, max, n_masked + 1) (float32, exactly the official probs)."""
        if group not in self._strata:
            n = int(self.n_global_crops * group * self.mask_probability)
            p = torch.linspace(*self.mask_ratio, n + 1, dtype=torch.float32).numpy()
            self._strata[group] = (p[:-1], p[1:])
        return self._strata[group]

    def _caps(self, group: int) -> np.ndarray:
        """int(N * p_k+1) per stratum, in float32 as the official upperbound."""
        return np.floor(np.float32(self.generator.num_patches) * self.strata(group)[1]).astype(np.int64)

    def _group(self, batch_size: int) -> int:
        g = self.group_size or batch_size
        if batch_size < 1 or batch_size % g:
            raise ValueError(f"IBOTMasks: batch of {batch_size} images is not a positive multiple of "
                             f"group_size {g}")
        return g

    def upper_bound(self, batch_size: int) -> int:
        """Most masked tokens of a batch of `batch_size` images: (batch/group) * sum_k int(N * p_k+1)."""
        g = self._group(batch_size)
        return batch_size // g * int(self._caps(g).sum())

    def targets(self, seed: int, epoch: int, indices) -> np.ndarray:
        """Target masked patches per sample, int64 [n_global, B] (0 = no mask)."""
        idx = np.asarray(indices, np.int64)
        if idx.ndim != 1:
            raise ValueError(f"IBOTMasks: indices must be 1-D (the batch's dataset indices), got shape {idx.shape}")
        B, C = idx.size, self.n_global_crops
        g = self._group(B)
        u = uniforms(seed, epoch, idx[None, :], _crop_id(np.arange(C)[:, None], 0), 2)  # [C, B, 2]
        # group-major view: [B/g groups, C*g samples]; rank by priority = a uniform shuffle of the group
        prio = u[..., 0].reshape(C, B // g, g).transpose(1, 0, 2).reshape(B // g, C * g)
        rank = np.empty_like(prio, dtype=np.int64)
        np.put_along_axis(rank, np.argsort(prio, 1, kind="stable"), np.arange(C * g)[None, :], 1)
        rank = rank.reshape(B // g, C, g).transpose(1, 0, 2).reshape(C, B)
        lo, hi = self.strata(g)
        if lo.size == 0:
            return np.zeros((C, B), np.int64)
        caps = self._caps(g)
        masked = rank < lo.size  # the sample of rank k < n_masked takes stratum k
        k = np.minimum(rank, lo.size - 1)
        # official: int(N * random.uniform(lo, hi)) on float32 tensors; the cap guards float32 rounding
        ratio = lo[k] + (hi[k] - lo[k]) * u[..., 1].astype(np.float32)
        n = np.floor(np.float32(self.generator.num_patches) * ratio).astype(np.int64)
        return np.where(masked, np.minimum(n, caps[k]), 0)

    def __call__(self, seed: int, epoch: int, indices) -> MaskBatch:
        idx = np.asarray(indices, np.int64)
        n = self.targets(seed, epoch, idx)
        C, B = n.shape
        masks = self.generator(n, seed, epoch, idx[None, :], np.arange(C)[:, None]).reshape(C * B, -1)
        ub = self.upper_bound(B)
        flat = np.flatnonzero(masks)
        if flat.size > ub:  # cannot happen: each mask stays within its target, each target within its cap
            raise AssertionError(f"IBOTMasks: {flat.size} masked tokens exceed the upper bound {ub}")
        counts = masks.sum(1)
        indices_out = np.zeros(ub, np.int64)
        weights = np.zeros(ub, np.float32)
        indices_out[:flat.size] = flat
        weights[:flat.size] = (np.float32(1.0) / np.maximum(counts, 1).astype(np.float32))[flat // masks.shape[1]]
        return MaskBatch(torch.from_numpy(masks), torch.from_numpy(indices_out), torch.from_numpy(weights),
                         torch.tensor(flat.size, dtype=torch.int64))
