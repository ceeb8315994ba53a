"""Which sample comes at each position of an infinite training stream, and with which random draws.

A stream position is turned into a `SamplePlan` by a pure function of (seed, stream, rank,
position), so a stream resumes at any position with the exact same batches, independently of the
number of loader workers. Without rare class sampling each epoch is a permutation of the dataset
(seeded by the epoch), split across ranks (rank r takes every world_size-th index). With rare class
sampling (DAFormer) each position draws a class c with P(c) = softmax((1 - f_c) / T), then an image
holding at least ``min_pixels`` of it, then up to 10 crop attempts (the first whose crop holds at
least ``min_crop_ratio * min_pixels`` pixels of c is kept; else the attempt with most pixels of c).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastuda.data.augment import ColorJitterDraw, draw_color_jitter
from fastuda.data.transforms import CROP_TRIES, CropParams, draw_crop_params

# min_pixels is published for ~1-2 MPixel labels; smaller images scale it by their area over this
RCS_REFERENCE_AREA = 1024 * 512


@dataclass(frozen=True)
class SamplePlan:
    position: int
    index: int  # dataset index
    attempts: tuple[CropParams, ...]  # one, or CROP_TRIES with rare class sampling
    rcs_class: int | None = None
    jitter: ColorJitterDraw | None = None  # the source's ColorJitter (data.source.color_jitter)


class RareClassSampler:
    """Rare class sampling from per-image class pixel counts ``counts`` [N, C].

    f_c = total pixels of class c / total labelled pixels; P(c) = softmax((1 - f_c) / T) over the
    classes that occur. Classes without an image holding ``min_pixels`` of them cannot be drawn;
    their probability is spread over the others by renormalising.
    """

    def __init__(self, counts: np.ndarray, temperature: float, min_pixels: int,
                 areas: np.ndarray | None = None, min_crop_ratio: float = 0.5) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] == 0:
            raise ValueError(f"counts must be [num_images, num_classes], got {counts.shape}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if areas is not None and len(areas):
            scale = min(1.0, float(np.median(areas)) / RCS_REFERENCE_AREA)
            min_pixels = max(1, round(min_pixels * scale))
        self.min_pixels = int(min_pixels)
        self.min_crop_pixels = max(1, int(min_crop_ratio * self.min_pixels))
        totals = counts.sum(axis=0)
        if totals.sum() == 0:
            raise ValueError("rare class sampling needs labelled pixels; all counts are zero")
        freq = totals / totals.sum()
        present = np.flatnonzero(totals > 0)
        logits = (1.0 - freq[present]) / temperature
        probs = np.exp(logits - logits.max())
        self.freq = freq
        self.class_probs_published = dict(
            zip(present.tolist(), (probs / probs.sum()).tolist(), strict=True))
        self.images_with_class = {int(c): np.flatnonzero(counts[:, c] >= self.min_pixels)
                                  for c in present}
        keep = np.array([self.images_with_class[int(c)].size > 0 for c in present])
        if not keep.any():
            raise ValueError(f"no image holds >= {self.min_pixels} pixels of any class")
        self.classes = present[keep]
        p = probs[keep]
        self.probs = p / p.sum()

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(class, dataset index)."""
        c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
        candidates = self.images_with_class[c]
        return c, int(candidates[rng.integers(len(candidates))])


class SamplePlanner:
    """position -> SamplePlan, a pure function (see the module doc)."""

    def __init__(self, num_samples: int, *, seed: int, stream: int, rank: int = 0,
                 world_size: int = 1, ratio_range: tuple[float, float] = (0.5, 2.0),
                 flip_prob: float = 0.5, rcs: RareClassSampler | None = None,
                 scale_choices: tuple[float, ...] = (),
                 color_jitter: tuple[float, ...] = ()) -> None:
        if num_samples <= 0:
            raise ValueError("empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.num_samples = num_samples
        self.seed, self.stream, self.rank, self.world_size = seed, stream, rank, world_size
        self.ratio_range = ratio_range
        self.scale_choices = tuple(scale_choices)  # given: the scale is one of these
        self.color_jitter = tuple(color_jitter)  # (b, c, s, h) strengths; () = no jitter
        self.flip_prob = flip_prob
        self.rcs = rcs
        # every rank gets the same number of samples per epoch (the rest of the permutation waits
        # for the next epoch); a dataset smaller than world_size is repeated
        self.epoch_length = max(1, num_samples // world_size)
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, self.stream, 0x9E37, epoch])
            reps = -(-self.world_size // self.num_samples)  # ceil: enough for tiny datasets
            self._perm = np.concatenate([rng.permutation(self.num_samples) for _ in range(reps)])
            self._perm_epoch = epoch
        return self._perm

    def jitter_draw(self, position: int) -> ColorJitterDraw | None:
        """The colour jitter of a position, from its own generator: switching the jitter on or
        off leaves every other draw of the stream (sample, crop, flip) as it was."""
        if not self.color_jitter:
            return None
        rng = np.random.default_rng([self.seed, self.stream, self.rank, position, 0xC010])
        return draw_color_jitter(rng, self.color_jitter)

    def plan(self, position: int) -> SamplePlan:
        rng = np.random.default_rng([self.seed, self.stream, self.rank, position])
        jitter = self.jitter_draw(position)
        if self.rcs is not None:
            c, index = self.rcs.draw(rng)
            attempts = tuple(draw_crop_params(rng, self.ratio_range, self.flip_prob,
                                              self.scale_choices)
                             for _ in range(CROP_TRIES))
            return SamplePlan(position, index, attempts, c, jitter)
        epoch, j = divmod(position, self.epoch_length)
        index = int(self._permutation(epoch)[self.rank + j * self.world_size])
        params = draw_crop_params(rng, self.ratio_range, self.flip_prob, self.scale_choices)
        return SamplePlan(position, index, (params,), None, jitter)
