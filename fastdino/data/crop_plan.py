"""Which crops each step makes: the crop sets (sizes) and when the Gram-teacher crops are made.

One crop set is (global size, local size, Gram-teacher size, probability). A run has one set
(data.global_crop_size, data.local_crop_size, data.gram_crop_size) or several (data.crop_sets: DINOv3's
high-resolution adaptation, whose official config lists crops.global_crops_size, local_crops_size,
gram_teacher_crops_size and global_local_crop_pairs_ratios and draws one of those loaders per batch).
With several, step `it` (the global iteration) takes set k with probability p_k / sum(p) by a keyed draw
of (seed, it): the same on every rank and a pure function of the step, so resume and the world size do
not change it. Every crop of an image keeps its random draws (box, flip, colour ...) whatever the set:
only the output sizes change.

The Gram-teacher crops (DINOv3 Gram anchoring, fastdino/gram.py) are made only from step `gram_from`
on (gram.start_epoch's first step): before it the Gram teacher does not run, so the loader does not
spend time on its crops (its batches are the 2 + N crops only).

A step's layout is (set number, Gram crops made?): `specs(layout)` is its list of CropSpec, crop-major
(fastdino/data/augment.py's crop_specs), `global_size(layout)` its global crops' size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastdino.data.augment import CropSpec, crop_specs, uniforms

CROP_SET_KEY = -2  # the crop id of the per-step set draw, uniforms(seed, it, 0, CROP_SET_KEY, 1); no crop uses it


@dataclass(frozen=True)
class CropSet:
    global_size: int
    local_size: int
    gram_size: int = 0  # 0: no Gram-teacher crops
    p: float = 1.0  # relative probability of the set


def config_crop_sets(data_cfg) -> tuple[CropSet, ...]:
    """data.crop_sets as CropSets, or the one set of data.global_crop_size / local_crop_size / gram_crop_size."""
    sets = getattr(data_cfg, "crop_sets", None) or []
    if not sets:
        return (CropSet(int(data_cfg.global_crop_size), int(data_cfg.local_crop_size),
                        int(getattr(data_cfg, "gram_crop_size", 0))),)
    return tuple(CropSet(int(s["global"]), int(s["local"]), int(s.get("gram", 0)), float(s["p"])) for s in sets)


class CropPlan:
    """The crops of every step (see the module docstring)."""

    def __init__(self, sets, n_local: int, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
                 horizontal_flips: bool = True, seed: int = 0, gram_from: int = 0):
        self.sets = tuple(sets)
        if not self.sets:
            raise ValueError("CropPlan: no crop set")
        p = np.array([s.p for s in self.sets], np.float64)
        if not (np.all(np.isfinite(p)) and np.all(p > 0)):
            raise ValueError(f"CropPlan: crop set probabilities must be > 0, got {p.tolist()}")
        self.cdf = np.cumsum(p / p.sum())
        self.n_local, self.seed, self.gram_from = int(n_local), int(seed), int(gram_from)
        self.scales, self.horizontal_flips = (tuple(global_scale), tuple(local_scale)), bool(horizontal_flips)
        self._specs: dict = {}

    @classmethod
    def from_config(cls, data_cfg, seed: int = 0, gram_from: int = 0) -> "CropPlan":
        return cls(config_crop_sets(data_cfg), data_cfg.local_crops_number, data_cfg.global_crops_scale,
                   data_cfg.local_crops_scale, getattr(data_cfg, "horizontal_flips", True), seed, gram_from)

    @property
    def multi_resolution(self) -> bool:
        return len(self.sets) > 1

    def set_index(self, it: int) -> int:
        """The crop set of step `it`: 0 with one set, else the keyed draw."""
        if len(self.sets) == 1:
            return 0
        u = uniforms(self.seed, int(it), 0, CROP_SET_KEY, 1)[0]
        return min(int(np.searchsorted(self.cdf, u, side="right")), len(self.sets) - 1)

    def layout(self, it: int) -> tuple[int, bool]:
        """(crop set, Gram-teacher crops made) of step `it`."""
        k = self.set_index(it)
        return k, bool(self.sets[k].gram_size) and it >= self.gram_from

    def specs(self, layout: tuple[int, bool]) -> list[CropSpec]:
        """The crop-major CropSpecs of a layout (2 global, N local, then 2 Gram-teacher crops if made)."""
        if layout not in self._specs:
            s = self.sets[layout[0]]
            self._specs[layout] = crop_specs(s.global_size, s.local_size, self.n_local, *self.scales,
                                             s.gram_size if layout[1] else 0, self.horizontal_flips)
        return self._specs[layout]

    def global_size(self, layout: tuple[int, bool]) -> int:
        return self.sets[layout[0]].global_size


__all__ = ["CropSet", "CropPlan", "config_crop_sets", "CROP_SET_KEY"]
