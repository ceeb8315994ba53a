"""DALI backend of the training streams (the ``dali`` extra: nvidia-dali-cuda130).

Same semantics and output as the PyTorch backend (loaders.py). The sample plan and the crop
geometry (which needs the label: cat_max_ratio, rare class sampling) are computed in DALI's
parallel Python workers by the very functions the PyTorch backend uses, so both backends crop the
same window, flip the same way and produce bit-identical labels for a seed. DALI then decodes the
image (``mixed`` device: PNG on the CPU, JPEG on the GPU, when a GPU is present; CPU operators with
``device_id=None`` otherwise), resamples only the crop window (``fn.resize`` with a region of
interest: linear, antialiased), flips and normalises (``fn.crop_mirror_normalize``) and pads with 0
to the crop size (``fn.pad``); the source's colour jitter, which DALI's operators do not
reproduce, is applied to that output (``augment.jitter_normalised``). Image pixels differ from
Pillow's resampling by rounding only (see tests/data/test_dali.py for the measured agreement).

Because a DALI decoder failing inside a batch cannot name its file, each worker checks the encoded
image first (PNG chunk CRCs, JPEG end marker, header size against the label), so bad files get the
same error or skip as with the PyTorch backend.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastuda.config import DataConfig
from fastuda.data.augment import jitter_normalised
from fastuda.data.classes import IGNORE_INDEX
from fastuda.data.datasets import SegDataset
from fastuda.data.io import DataError, check_encoded_image
from fastuda.data.loaders import CropSettings, plan_meta, realise_label
from fastuda.data.sampling import SamplePlan, SamplePlanner
from fastuda.data.transforms import Geometry
from fastuda.data.workers import exit_with_parent

# info vector per sample
_INFO = ("position", "index", "rcs_class", "top", "left", "valid_h", "valid_w", "scaled_h",
         "scaled_w", "orig_h", "orig_w", "flip")


class DaliSampleSource:
    """The per-sample callback of ``fn.external_source`` (runs in DALI's Python workers)."""

    def __init__(self, dataset: SegDataset, planner: SamplePlanner, settings: CropSettings,
                 start_position: int, batch_size: int) -> None:
        self.dataset, self.planner, self.settings = dataset, planner, settings
        self.start_position, self.batch_size = start_position, batch_size
        self.owner_pid = os.getpid()  # the trainer; DALI calls this object in its workers
        self._armed_pid = self.owner_pid

    def _load(self, index: int) -> tuple[bytes, np.ndarray, int, list[tuple[str, str]]]:
        ds = self.dataset
        skipped: list[tuple[str, str]] = []
        for k in range(len(ds)):
            j = (index + k) % len(ds)
            f = ds.files[j]
            try:
                try:
                    with open(f.image, "rb") as fh:
                        data = fh.read()
                except OSError as err:
                    raise DataError(f.image, f"cannot read: {err}") from None
                check_encoded_image(data, f.image)
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        h, w = im.height, im.width
                except Exception as err:  # noqa: BLE001
                    raise DataError(f.image, f"not a readable image: {err}") from None
                label = ds.load_label(j)
                if label is None:
                    label = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
                elif label.shape != (h, w):
                    raise DataError(f.label, f"label size {label.shape[1]}x{label.shape[0]} "
                                             f"differs from the image size {w}x{h} ({f.image})")
                return data, label, j, skipped
            except DataError as err:
                if ds.on_error == "raise":
                    raise
                skipped.append((err.path, err.problem))
        raise DataError(ds.root, f"every one of the {len(ds)} samples of {ds.name} is unreadable")

    def __call__(self, info: Any) -> tuple[np.ndarray, ...]:
        if self._armed_pid != os.getpid():  # first call in a new worker (DALI has no init hook)
            self._armed_pid = os.getpid()
            exit_with_parent(self.owner_pid)
        position = self.start_position + info.iteration * self.batch_size + info.idx_in_batch
        plan = self.planner.plan(position)
        data, label, index, skipped = self._load(plan.index)
        if index != plan.index:
            plan = replace(plan, index=index)
        g, label_crop = realise_label(label, plan, self.settings)
        x0, y0, x1, y1 = g.source_box()
        rcs_class = -1 if plan.rcs_class is None else plan.rcs_class
        values = (position, index, rcs_class, g.top, g.left, g.valid_h, g.valid_w, g.scaled_h,
                  g.scaled_w, g.orig_h, g.orig_w, int(g.flip))
        return (np.frombuffer(data, dtype=np.uint8), label_crop,
                np.array([y0, x0], dtype=np.float32), np.array([y1, x1], dtype=np.float32),
                np.array([g.valid_h, g.valid_w], dtype=np.float32),
                np.array(int(g.flip), dtype=np.int32), np.array(values, dtype=np.int64),
                np.frombuffer(json.dumps(skipped).encode(), dtype=np.uint8))


def build_pipeline(source: DaliSampleSource, cfg: DataConfig, device_id: int | None,
                   seed: int) -> Any:
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    workers = cfg.num_workers
    start_method = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
    pipe = Pipeline(batch_size=cfg.batch_size, num_threads=max(1, workers), device_id=device_id,
                    seed=seed, py_num_workers=max(1, workers), py_start_method=start_method,
                    prefetch_queue_depth=2)
    with pipe:
        enc, label, roi_start, roi_end, size, flip, info, skipped = fn.external_source(
            source=source, num_outputs=8, batch=False, parallel=workers > 0,
            dtype=[types.UINT8, types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32,
                   types.INT64, types.UINT8])
        image = fn.decoders.image(enc, device="mixed" if device_id is not None else "cpu",
                                  output_type=types.RGB)
        image = fn.resize(image, size=size, roi_start=roi_start, roi_end=roi_end,
                          roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True)
        image = fn.crop_mirror_normalize(image, mirror=flip, mean=list(cfg.mean),
                                         std=list(cfg.std), dtype=types.FLOAT,
                                         output_layout="CHW")
        image = fn.pad(image, axis_names="HW", shape=[int(cfg.crop_size[0]),
                                                      int(cfg.crop_size[1])], fill_value=0.0)
        pipe.set_outputs(image, label, info, skipped)
    pipe.build()
    return pipe


def _to_torch(tensor_list: Any) -> torch.Tensor:
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tensor_list, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device="cuda")
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor_list.as_tensor()))


class DaliTrainBatches:
    """An infinite DALI pipeline over stream positions start, start+1, ..."""

    def __init__(self, dataset: SegDataset, planner: SamplePlanner, settings: CropSettings,
                 cfg: DataConfig, *, seed: int) -> None:
        self.dataset, self.planner, self.settings, self.cfg = dataset, planner, settings, cfg
        self.seed = seed
        self.device_id = torch.cuda.current_device() if torch.cuda.is_available() else None

    def batches(self, start_batch: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        source = DaliSampleSource(self.dataset, self.planner, self.settings,
                                  start_batch * cfg.batch_size, cfg.batch_size)
        pipe = build_pipeline(source, cfg, self.device_id, self.seed)
        try:
            batch_index = start_batch
            while True:
                try:
                    image, label, info, skipped = pipe.run()
                except Exception as err:  # noqa: BLE001 - DALI re-raises worker errors as Exception
                    raise self._data_error(err, batch_index) from err
                batch_index += 1
                yield self._batch(image, label, info, skipped)
        finally:
            del pipe

    def _data_error(self, err: Exception, batch_index: int) -> DataError:
        """A DataError raised in a DALI worker arrives as text: rebuild it; for any other
        failure name the files of the batch."""
        text, marker = str(err), "DataError: "
        if marker in text:
            line = text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
            path, _, problem = line.partition(": ")
            return DataError(path, problem)
        size = self.cfg.batch_size
        files = [self.dataset.files[self.planner.plan(p).index].image
                 for p in range(batch_index * size, (batch_index + 1) * size)]
        return DataError(", ".join(files), f"DALI failed on this batch: {err}")

    def _batch(self, image: Any, label: Any, info: Any, skipped: Any) -> dict[str, Any]:
        info_np = np.array(info.as_tensor())
        metas = []
        for b, row in enumerate(info_np):
            v = dict(zip(_INFO, (int(x) for x in row), strict=True))
            g = Geometry(v["orig_h"], v["orig_w"], v["scaled_h"], v["scaled_w"], v["top"],
                         v["left"], int(self.cfg.crop_size[0]), int(self.cfg.crop_size[1]),
                         bool(v["flip"]))
            plan = SamplePlan(v["position"], v["index"], (),
                              None if v["rcs_class"] < 0 else v["rcs_class"])
            f = self.dataset.files[v["index"]]
            meta = {"path": f.image, "label_path": f.label, "index": v["index"],
                    "dataset": self.dataset.name, "has_label": f.label is not None,
                    "orig_size": (v["orig_h"], v["orig_w"]),
                    "skipped": [tuple(s) for s in json.loads(np.array(skipped[b]).tobytes())]}
            if f.depth is not None:
                meta["depth_path"] = f.depth
            if f.day is not None:  # the day crop is read by TrainIterator (fastuda/data/day.py)
                meta["day_path"] = f.day
            metas.append(plan_meta(plan, g, meta))
        images = _to_torch(image)
        if self.planner.color_jitter:  # on the normalised output: DALI has no such operator
            draws = [self.planner.jitter_draw(m["position"]) for m in metas]
            images = jitter_normalised(images, metas, draws, self.cfg.mean, self.cfg.std)
        return {"image": images, "label": _to_torch(label).long(), "meta": metas}
