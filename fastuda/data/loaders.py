"""Training streams and the validation loader (PyTorch DataLoader backend; DALI in dali.py).

`build_train_iterators` returns infinite (source, target) `TrainIterator`s; ``next(it)`` gives
``{"image": float [B,3,H,W] normalised, "label": long [B,H,W] train ids (255 ignore),
"meta": [dict per image]}``, and with ``depth=True`` also ``"depth": float [B,H,W]`` inverse depth
(NaN invalid; fastuda/data/depth.py), cropped like the label (CorDA asks for it), and with
``day=True`` (target stream only) ``"day": float [B,3,H,W]``, the paired daytime images cropped,
flipped and normalised like the night images (SePiCo's Dark Zurich variant; fastuda/data/day.py).
An iterator's
state is the number of batches it has handed out, so
``load_state_dict`` resumes with the exact batches that would have followed (sample plans are a pure
function of seed, stream, rank and position; see sampling.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastuda.config import DataConfig, DatasetConfig
from fastuda.data.augment import jitter_crop
from fastuda.data.datasets import SegDataset, build_dataset
from fastuda.data.day import day_crop
from fastuda.data.depth import depth_crop, load_depth_batch
from fastuda.data.io import DataError
from fastuda.data.sampling import RareClassSampler, SamplePlan, SamplePlanner
from fastuda.data.stats import count_matrix
from fastuda.data.transforms import Geometry, choose_crop, crop_image, resize_pair
from fastuda.data.workers import torch_worker_init

log = logging.getLogger(__name__)

SOURCE_STREAM, TARGET_STREAM = 0, 1


@dataclass(frozen=True)
class CropSettings:
    crop_hw: tuple[int, int]
    resize_wh: tuple[int, int] | None
    cat_max_ratio: float
    min_crop_pixels: int = 1  # rare class sampling: pixels of the drawn class a crop must hold
    keep_ratio: bool = False  # resize_wh as mmcv's keep_ratio=True Resize (transforms.scaled_size)
    small_crop: str = "pad"  # a rescaled image smaller than the crop: "pad" or "resize" (fit_crop)


def crop_settings(cfg: DataConfig, dataset_cfg: DatasetConfig,
                  rcs: RareClassSampler | None = None, *, stream: int = SOURCE_STREAM
                  ) -> CropSettings:
    """The crop rule of one stream. The target stream never reads its labels to choose a crop
    (cat_max_ratio 1: the first draw): they are the target's ground truth, which adaptation must
    not see; the releases' target RandomCrop has no cat_max_ratio either (DAFormer
    configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py#L28, HRDA
    uda_gtaHR_to_cityscapesHR_1024x1024.py#L28)."""
    cat_max_ratio = 1.0 if stream == TARGET_STREAM else float(cfg.cat_max_ratio)
    return CropSettings((int(cfg.crop_size[0]), int(cfg.crop_size[1])), _resize(dataset_cfg),
                        cat_max_ratio, rcs.min_crop_pixels if rcs else 1,
                        dataset_cfg.keep_ratio, cfg.small_crop)


def _resize(dataset_cfg: DatasetConfig) -> tuple[int, int] | None:
    if not dataset_cfg.resize:
        return None
    if len(dataset_cfg.resize) != 2 or min(dataset_cfg.resize) <= 0:
        raise DataError("resize", f"expected [width, height] > 0, got {dataset_cfg.resize}")
    return int(dataset_cfg.resize[0]), int(dataset_cfg.resize[1])


def realise_label(label: np.ndarray, plan: SamplePlan, settings: CropSettings
                  ) -> tuple[Geometry, np.ndarray]:
    """The crop geometry of a plan and the finished label crop (shared by both loaders)."""
    if plan.rcs_class is None:
        return choose_crop(label, plan.attempts[0], settings.crop_hw, settings.resize_wh,
                           settings.cat_max_ratio, settings.keep_ratio, settings.small_crop)
    best, best_count = None, -1
    for params in plan.attempts:
        g, crop = choose_crop(label, params, settings.crop_hw, settings.resize_wh,
                              settings.cat_max_ratio, settings.keep_ratio, settings.small_crop)
        count = int(np.count_nonzero(crop == plan.rcs_class))
        if count >= settings.min_crop_pixels:
            return g, crop
        if count > best_count:
            best, best_count = (g, crop), count
    assert best is not None
    return best


def plan_meta(plan: SamplePlan, g: Geometry, meta: dict[str, Any]) -> dict[str, Any]:
    meta = dict(meta)
    meta.update(g.as_meta())
    meta["position"] = plan.position
    if plan.rcs_class is not None:
        meta["rcs_class"] = plan.rcs_class
    return meta


class _TrainSamples(Dataset):
    """Map-style view for the DataLoader: item ``position`` is the sample planned there."""

    def __init__(self, dataset: SegDataset, planner: SamplePlanner, settings: CropSettings,
                 depth: bool = False, day: bool = False) -> None:
        self.dataset, self.planner, self.settings = dataset, planner, settings
        self.depth, self.day = depth, day

    def __len__(self) -> int:  # the stream is infinite; the sampler never asks for this
        return 2**62

    def __getitem__(self, position: int) -> dict[str, Any]:
        plan = self.planner.plan(position)
        try:
            image, label, meta = self.dataset.load_or_skip(plan.index)
        except DataError as err:  # raised in the main process (see _raise_data_error)
            return {"data_error": (err.path, err.problem)}
        if meta["skipped"] and plan.rcs_class is not None:
            plan = replace(plan, index=meta["index"])
        g, label_crop = realise_label(label, plan, self.settings)
        crop = crop_image(image, g)
        if plan.jitter is not None:
            crop = jitter_crop(crop, (g.valid_h, g.valid_w), plan.jitter)
        item = {"image": torch.from_numpy(crop).permute(2, 0, 1),
                "label": torch.from_numpy(label_crop), "meta": plan_meta(plan, g, meta)}
        if self.depth:  # read here, in the loader's worker, with the label's geometry
            item["depth"] = torch.from_numpy(depth_crop(item["meta"], self.settings.crop_hw))
        if self.day:
            try:
                day = day_crop(item["meta"], self.settings.crop_hw)
            except DataError as err:
                return {"data_error": (err.path, err.problem)}
            item["day"] = torch.from_numpy(day).permute(2, 0, 1)
        return item


class _Positions(torch.utils.data.Sampler):
    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            yield position
            position += 1


def _raise_data_error(item: dict[str, Any]) -> None:
    """A DataError of a loader worker travels as a value and is raised here, in the main process:
    re-raised by the DataLoader it would be a RuntimeError with the worker's whole traceback."""
    if "data_error" in item:
        raise DataError(*item["data_error"])


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    for it in items:
        if "data_error" in it:
            return it
    batch = {"image": torch.stack([it["image"] for it in items]),
             "label": torch.stack([it["label"] for it in items]),
             "meta": [it["meta"] for it in items]}
    if "depth" in items[0]:
        batch["depth"] = torch.stack([it["depth"] for it in items])
    if "day" in items[0]:
        batch["day"] = torch.stack([it["day"] for it in items])
    return batch


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 (x - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() - m) / s


def finish_batch(batch: dict[str, Any], mean: list[float], std: list[float]) -> dict[str, Any]:
    """Normalise, and set the padding to 0 (the normalised mean colour) as mmseg pads."""
    out = {"image": _normalise_padded(batch["image"], batch["meta"], mean, std),
           "label": batch["label"].long(), "meta": batch["meta"]}
    if "depth" in batch:
        out["depth"] = batch["depth"]
    if "day" in batch:  # the night image's crop box: the same padding
        out["day"] = _normalise_padded(batch["day"], batch["meta"], mean, std)
    return out


def _normalise_padded(images: torch.Tensor, metas: list[dict[str, Any]], mean: list[float],
                      std: list[float]) -> torch.Tensor:
    image = normalise(images, mean, std)
    for b, meta in enumerate(metas):
        _, _, h, w = meta["crop_box"]
        image[b, :, h:, :] = 0
        image[b, :, :, w:] = 0
    return image


class TorchTrainBatches:
    """An infinite DataLoader over stream positions start, start+1, ..."""

    def __init__(self, dataset: SegDataset, planner: SamplePlanner, settings: CropSettings,
                 cfg: DataConfig, depth: bool = False, day: bool = False) -> None:
        self.samples = _TrainSamples(dataset, planner, settings, depth, day)
        self.cfg = cfg

    def batches(self, start_batch: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        loader = DataLoader(self.samples, batch_size=cfg.batch_size,
                            sampler=_Positions(start_batch * cfg.batch_size),
                            num_workers=cfg.num_workers, collate_fn=_collate,
                            worker_init_fn=partial(torch_worker_init, os.getpid()),
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=2 if cfg.num_workers > 0 else None)
        for batch in loader:
            _raise_data_error(batch)
            yield finish_batch(batch, cfg.mean, cfg.std)


class TrainIterator:
    """Infinite batches of one domain; checkpointable (state = batches handed out)."""

    def __init__(self, dataset: SegDataset, planner: SamplePlanner, backend: Any,
                 kind: str, depth: bool = False, day: bool = False,
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        self.dataset = dataset
        self.planner = planner
        self.backend = backend
        self.kind = kind  # "torch" or "dali"
        self.depth = depth
        self.day = day
        self.mean, self.std = mean, std
        self.position = 0  # batches handed out
        self.skipped: dict[str, str] = {}
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self.backend.batches(self.position)
        batch = next(self._it)
        if self.depth and "depth" not in batch:
            # DALI decodes images and labels only: its batches get their depth maps here,
            # decoded by threads (the PyTorch loader reads them in its workers)
            batch["depth"] = load_depth_batch(batch)
        if self.day and "day" not in batch:  # DALI: the day crops are read here
            crop_hw = tuple(int(x) for x in batch["image"].shape[-2:])
            day = torch.stack([torch.from_numpy(day_crop(m, crop_hw)).permute(2, 0, 1)
                               for m in batch["meta"]])
            assert self.mean is not None and self.std is not None
            batch["day"] = _normalise_padded(day, batch["meta"], self.mean,
                                             self.std).to(batch["image"].device)
        self.position += 1
        for meta in batch["meta"]:
            for path, problem in meta.get("skipped", ()):
                if path not in self.skipped:
                    log.warning("%s: skipped %s: %s", self.dataset.name, path, problem)
                    self.skipped[path] = problem
        return batch

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def state_dict(self) -> dict[str, Any]:
        p = self.planner
        return {"position": self.position, "seed": p.seed, "stream": p.stream, "rank": p.rank,
                "world_size": p.world_size, "num_samples": p.num_samples,
                "rcs": p.rcs is not None, "skipped": len(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.planner
        for key, mine in (("seed", p.seed), ("stream", p.stream), ("num_samples", p.num_samples),
                          ("rcs", p.rcs is not None)):
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume {self.dataset.name} stream: checkpoint has "
                                 f"{key}={state[key]!r}, this run has {mine!r}")
        if state.get("world_size", p.world_size) != p.world_size:
            log.warning("%s: resuming with world_size %d (checkpoint: %d); the stream differs "
                        "from the uninterrupted run", self.dataset.name, p.world_size,
                        state["world_size"])
        self.close()
        self.position = int(state["position"])


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_loader(kind: str) -> str:
    """"auto": DALI when it is installed, else the PyTorch DataLoader.

    DALI is taken on CPU-only machines too: there its CPU operators still beat Pillow at decoding
    and resampling (benchmarks/data_bench.py on 2 shared cores, 1024x512 PNG -> 512x512 crops,
    2 workers: 13-19 images/s for DALI vs 7-12 for the DataLoader), at the same start-up cost.
    """
    if kind == "auto":
        return "dali" if dali_available() else "torch"
    if kind == "dali" and not dali_available():
        raise DataError("data.loader", "DALI is not installed; `pip install fastuda[dali]` "
                                       "(nvidia-dali-cuda130) or set data.loader = \"torch\"")
    if kind not in ("dali", "torch"):
        raise DataError("data.loader", f"unknown loader {kind!r} (auto, dali, torch)")
    return kind


def build_train_iterator(cfg: DataConfig, dataset_cfg: DatasetConfig, *, stream: int, seed: int,
                         rank: int = 0, world_size: int = 1, rcs: bool = False,
                         loader: str | None = None, depth: bool = False, day: bool = False
                         ) -> TrainIterator:
    dataset = build_dataset(dataset_cfg, on_error=cfg.on_error, day=day)
    sampler = None
    if rcs:
        if not dataset.has_labels:
            raise DataError(dataset.root, "rare class sampling needs a labelled dataset")
        counts, areas = count_matrix(dataset)
        sampler = RareClassSampler(counts, cfg.rcs_temperature, cfg.rcs_min_pixels, areas,
                                   cfg.rcs_min_crop_ratio)
    planner = SamplePlanner(len(dataset), seed=seed, stream=stream, rank=rank,
                            world_size=world_size, ratio_range=tuple(cfg.ratio_range),
                            flip_prob=cfg.flip_prob, rcs=sampler,
                            scale_choices=tuple(cfg.scale_choices),
                            color_jitter=tuple(dataset_cfg.color_jitter))
    settings = crop_settings(cfg, dataset_cfg, sampler, stream=stream)
    kind = resolve_loader(loader or cfg.loader)
    if kind == "dali":
        from fastuda.data.dali import DaliTrainBatches

        backend: Any = DaliTrainBatches(dataset, planner, settings, cfg, seed=seed)
    else:
        backend = TorchTrainBatches(dataset, planner, settings, cfg, depth, day)
    return TrainIterator(dataset, planner, backend, kind, depth, day, cfg.mean, cfg.std)


def build_train_iterators(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1,
                          depth: bool = False, day: bool = False
                          ) -> tuple[TrainIterator, TrainIterator]:
    """Infinite (source, target) streams; rare class sampling on the source when cfg.rcs;
    ``depth``: the batches carry the depth maps; ``day``: the target batches carry the day
    partners of their (Dark Zurich night) images."""
    source = build_train_iterator(cfg, cfg.source, stream=SOURCE_STREAM, seed=seed, rank=rank,
                                  world_size=world_size, rcs=cfg.rcs, depth=depth)
    target = build_train_iterator(cfg, cfg.target, stream=TARGET_STREAM, seed=seed, rank=rank,
                                  world_size=world_size, depth=depth, day=day)
    return source, target


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
class _ValSamples(Dataset):
    def __init__(self, dataset: SegDataset, indices: list[int], resize_wh: tuple[int, int] | None,
                 keep_ratio: bool = False, original_labels: bool = False) -> None:
        self.dataset, self.indices, self.resize_wh = dataset, indices, resize_wh
        self.keep_ratio, self.original_labels = keep_ratio, original_labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        try:
            image, label, meta = self.dataset.load(i)
        except DataError as err:
            if self.dataset.on_error == "raise":
                return {"data_error": (err.path, err.problem)}
            return {"skipped": (err.path, err.problem)}
        image, resized = resize_pair(image, label, self.resize_wh, self.keep_ratio)
        label = label if self.original_labels else resized
        meta["size"] = tuple(image.shape[:2])
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                "label": torch.from_numpy(np.ascontiguousarray(label)), "meta": meta}


class ValLoader:
    """Deterministic, un-augmented batches of one image over this rank's share of the split;
    the labels at the image's size, or at their own with ``data.val_labels = "original"``.

    With on_error="skip" bad samples are left out (not replaced: evaluation must not count an
    image twice); ``skipped`` lists them after iterating.
    """

    def __init__(self, dataset: SegDataset, cfg: DataConfig, rank: int, world_size: int) -> None:
        self.dataset = dataset
        self.cfg = cfg
        self.samples = _ValSamples(dataset, list(range(rank, len(dataset), world_size)),
                                   _resize(cfg.val), cfg.val.keep_ratio,
                                   cfg.val_labels == "original")
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = min(self.cfg.num_workers, len(self.samples))
        loader = DataLoader(self.samples, batch_size=None, shuffle=False, num_workers=workers,
                            worker_init_fn=partial(torch_worker_init, os.getpid()),
                            pin_memory=torch.cuda.is_available())
        for item in loader:
            _raise_data_error(item)
            if "skipped" in item:
                path, problem = item["skipped"]
                log.warning("%s: skipped %s: %s", self.dataset.name, path, problem)
                self.skipped[path] = problem
                continue
            yield {"image": normalise(item["image"][None], self.cfg.mean, self.cfg.std),
                   "label": item["label"][None].long(), "meta": [item["meta"]]}


def build_val_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1) -> ValLoader:
    """Batches of one image of cfg.val, resized per cfg.val.resize, in file order, sharded."""
    dataset = build_dataset(cfg.val, on_error=cfg.on_error)
    if not dataset.has_labels:
        raise DataError(dataset.root, f"validation split {cfg.val.split!r} of {cfg.val.name} "
                                      f"has no labels")
    return ValLoader(dataset, cfg, rank, world_size)
