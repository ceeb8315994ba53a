"""Builders of small dataset trees in the real download formats (used by the data tests).

PNG files with 16-bit RGB samples are written by a minimal encoder here (Pillow cannot write them),
cycling through all five PNG row filters so the reader is exercised on each.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# data.md: Cityscapes label id -> train id (written out here independently of fastuda.data)
SPEC_CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                   24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SPEC_SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12,
                8: 13, 19: 15, 12: 17, 11: 18}


def spec_map(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(raw.shape, 255, dtype=np.uint8)
    for k, v in table.items():
        out[raw == k] = v
    return out


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png16(path: Path, array: np.ndarray) -> None:
    """Write uint16 HxWxC (C = 3 or 4) as a 16-bit RGB(A) PNG, rows filtered 0,1,2,3,4,0,..."""
    h, w, c = array.shape
    colour_type = {3: 2, 4: 6}[c]
    bpp = 2 * c
    rows = np.ascontiguousarray(array.astype(">u2")).view(np.uint8).reshape(h, w * bpp)
    rows = rows.astype(np.int32)
    out = bytearray()
    prev = np.zeros(w * bpp, dtype=np.int32)
    for y in range(h):
        row = rows[y]
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        ftype = y % 5
        pred = [np.zeros_like(row), left, prev, (left + prev) // 2,
                _paeth(left, prev, upleft)][ftype]
        out.append(ftype)
        out += ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b""))


def _rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def random_ids(rng: np.random.Generator, h: int, w: int, values: list[int]) -> np.ndarray:
    """Blocky random label map over ``values`` (blocks keep crops multi-class)."""
    small = rng.choice(values, size=(max(1, h // 4), max(1, w // 4)))
    return np.kron(small, np.ones((4, 4), dtype=small.dtype))[:h, :w].astype(np.uint8)


def make_gta(root: Path, n: int = 3, h: int = 24, w: int = 40, seed: int = 0
             ) -> list[np.ndarray]:
    """GTA5: images/*.png and palette labels/*.png holding Cityscapes label ids."""
    rng = np.random.default_rng(seed)
    raws = []
    palette = rng.integers(0, 256, 768).astype(np.uint8).tolist()
    for i in range(n):
        name = f"{i + 1:05d}.png"
        _save(root / "images" / name, Image.fromarray(_rgb(rng, h, w)))
        raw = random_ids(rng, h, w, list(range(0, 34)))
        lab = Image.fromarray(raw, mode="P")
        lab.putpalette(palette)
        _save(root / "labels" / name, lab)
        raws.append(raw)
    return raws


def make_cityscapes(root: Path, splits: dict[str, int] | None = None, h: int = 24, w: int = 48,
                    seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for split, n in (splits or {"train": 3, "val": 2}).items():
        out[split] = []
        for i in range(n):
            city = ["aachen", "bochum"][i % 2]
            stem = f"{city}_{i:06d}_000019"
            _save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                  Image.fromarray(_rgb(rng, h, w)))
            raw = random_ids(rng, h, w, list(range(0, 34)))
            _save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                  Image.fromarray(raw, mode="L"))
            out[split].append(raw)
    # the natural sort order of the files is by name: aachen_* before bochum_*
    order = {s: sorted(range(len(v)), key=lambda i: (["aachen", "bochum"][i % 2], i))
             for s, v in out.items()}
    return {s: [v[i] for i in order[s]] for s, v in out.items()}


def make_synthia(root: Path, n: int = 3, h: int = 24, w: int = 40, seed: int = 0
                 ) -> list[np.ndarray]:
    """SYNTHIA RAND-CITYSCAPES: RGB/*.png, GT/LABELS/*.png (16-bit, class id in red)."""
    rng = np.random.default_rng(seed)
    raws = []
    for i in range(n):
        name = f"{i:07d}.png"
        _save(root / "RGB" / name, Image.fromarray(_rgb(rng, h, w)))
        cls = random_ids(rng, h, w, list(range(0, 23))).astype(np.uint16)
        gt = np.stack([cls, rng.integers(0, 3000, (h, w)), np.zeros((h, w))], axis=-1)
        write_png16(root / "GT" / "LABELS" / name, gt.astype(np.uint16))
        raws.append(cls.astype(np.uint8))
    return raws


def make_dark_zurich(root: Path, n_train: int = 2, n_val: int = 2, h: int = 24, w: int = 40,
                     seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        stem = f"GOPR0351_frame_{i:06d}"
        _save(root / "rgb_anon" / "train" / "night" / "GOPR0351" / f"{stem}_rgb_anon.png",
              Image.fromarray(_rgb(rng, h, w)))
    labels = []
    for i in range(n_val):
        stem = f"GOPR0356_frame_{i:06d}"
        _save(root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png",
              Image.fromarray(_rgb(rng, h, w)))
        lab = random_ids(rng, h, w, [*range(19), 255])
        _save(root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelTrainIds.png",
              Image.fromarray(lab, mode="L"))
        labels.append(lab)
    return labels


SMALL_SYNTHETIC = {"source": {"train": 24}, "target": {"train": 24, "val": 6},
                   "night": {"train": 4, "val": 4}}
