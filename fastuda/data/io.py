"""Reading images and labels with errors that name the file and the problem.

Labels are decoded to train ids through a `LabelEncoding` (train ids, Cityscapes label ids in a
palette or grayscale PNG, SYNTHIA's 16-bit RGB PNG with the class id in the red channel, or a
user label map). Pillow decodes 16-bit RGB PNGs to 8 bits by keeping the high byte of each sample,
which would erase SYNTHIA's class ids (all < 256); `read_label` re-decodes such files keeping the
low byte, and checks that the high byte is zero.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastuda.data.classes import (
    CITYSCAPES_ID_TO_TRAIN,
    CITYSCAPES_MAX_ID,
    IGNORE_INDEX,
    SYNTHIA_ID_TO_TRAIN,
    SYNTHIA_MAX_ID,
    lookup_table,
)


class DataError(RuntimeError):
    """A file of a dataset is missing, unreadable or inconsistent; the message names it."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class LabelEncoding:
    """How the raw values of a label PNG map to train ids, and which raw values are legal."""

    name: str
    lut: np.ndarray  # uint8[256]: raw value -> train id (255 = ignore)
    valid: np.ndarray  # bool[256]: raw values that may occur
    description: str
    red_channel: bool = False  # the class id is the red channel of an RGB label (SYNTHIA)

    def to_train_ids(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Map raw values to train ids, raising DataError if any value is outside the encoding."""
        present = np.bincount(raw.ravel(), minlength=256)
        bad = np.flatnonzero((present > 0) & ~self.valid)
        if bad.size:
            shown = ", ".join(str(int(v)) for v in bad[:8])
            raise DataError(path, f"label values outside the encoding ({self.description}): "
                                  f"{shown}{' ...' if bad.size > 8 else ''}")
        return self.lut[raw]


def train_id_encoding(num_classes: int) -> LabelEncoding:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    valid[:num_classes] = True
    valid[IGNORE_INDEX] = True
    return LabelEncoding("train_ids", lut, valid,
                         f"train ids 0..{num_classes - 1} or {IGNORE_INDEX}")


def cityscapes_id_encoding() -> LabelEncoding:
    valid = np.zeros(256, dtype=bool)
    valid[:CITYSCAPES_MAX_ID + 1] = True
    valid[IGNORE_INDEX] = True  # id -1 (license plate) when written as uint8
    return LabelEncoding("cityscapes_ids", lookup_table(CITYSCAPES_ID_TO_TRAIN), valid,
                         f"Cityscapes label ids 0..{CITYSCAPES_MAX_ID}")


def synthia_encoding() -> LabelEncoding:
    valid = np.zeros(256, dtype=bool)
    valid[:SYNTHIA_MAX_ID + 1] = True
    return LabelEncoding("synthia_ids", lookup_table(SYNTHIA_ID_TO_TRAIN), valid,
                         f"SYNTHIA class ids 0..{SYNTHIA_MAX_ID} in the red channel",
                         red_channel=True)


def map_encoding(label_map: dict[str, int], num_classes: int) -> LabelEncoding:
    """A user label map "raw id -> train id"; raw values not in the map become 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw, train in label_map.items():
        try:
            raw_id = int(raw)
        except ValueError:
            raise DataError("label_map", f"key {raw!r} is not an integer label id") from None
        if not 0 <= raw_id <= 255:
            raise DataError("label_map", f"key {raw!r} is outside 0..255")
        if not (0 <= train < num_classes or train == IGNORE_INDEX):
            raise DataError("label_map", f"value {train!r} for key {raw!r} is not a train id "
                                         f"(0..{num_classes - 1} or {IGNORE_INDEX})")
        lut[raw_id] = train
    return LabelEncoding("label_map", lut, np.ones(256, dtype=bool), "user label map")


def _open(path: str | Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (unknown or corrupt format)") from None
    except OSError as err:
        raise DataError(path, f"cannot open: {err}") from None


def _load(im: Image.Image, path: str | Path) -> None:
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, zlib.error, struct.error) as err:
        # Pillow reports a cut-off file as "image file is truncated"
        raise DataError(path, f"unreadable or truncated image: {err}") from None


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB."""
    with _open(path) as im:
        _load(im, path)
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.array(im)  # writable (np.asarray of a Pillow image is read-only)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    with _open(path) as im:
        return im.height, im.width


def _decode_16bit_low_byte(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Re-decode a 16-bit RGB(A) PNG: (low bytes, high bytes) of every sample, uint8 HxWxC."""
    planes = []
    for rawmode_suffix in (";16L", ";16B"):
        with _open(path) as im:
            tile = im.tile[0]
            mode = im.mode
            # reading the big-endian PNG samples as little-endian 16-bit values makes Pillow's
            # "keep the high byte" unpacker keep the low byte instead
            im.tile = [tile._replace(args=mode + rawmode_suffix)]
            _load(im, path)
            planes.append(np.asarray(im))
    return planes[0], planes[1]


def read_label(path: str | Path, encoding: LabelEncoding) -> np.ndarray:
    """Decode a label PNG to uint8 HxW train ids, validating its values against ``encoding``.
    Only PNG files are labels (whatever their name says)."""
    with _open(path) as im:
        if im.format != "PNG":
            # a lossy JPEG saved as .png changes label values and invents classes at edges
            raise DataError(path, f"label is a {im.format or 'unknown-format'} file, not a PNG "
                                  "(labels must be lossless PNGs)")
        mode = im.mode
        rawmode = im.tile[0].args if im.tile else None
        if encoding.red_channel:
            if mode in ("RGB", "RGBA") and rawmode in ("RGB;16B", "RGBA;16B"):
                im.close()
                low, high = _decode_16bit_low_byte(path)
                if high[..., 0].any():
                    raise DataError(path, "label values outside the encoding "
                                          f"({encoding.description}): red channel values > 255")
                raw = low[..., 0]
            elif mode in ("RGB", "RGBA"):
                _load(im, path)
                raw = np.asarray(im)[..., 0]
            elif mode in ("I;16", "I;16B", "I", "L", "P"):
                _load(im, path)
                arr = np.asarray(im)
                if arr.max(initial=0) > 255:
                    raise DataError(path, f"label values outside the encoding "
                                          f"({encoding.description}): {int(arr.max())}")
                raw = arr.astype(np.uint8)
            else:
                raise DataError(path, f"unsupported label image mode {mode!r} "
                                      f"(expected a 16-bit RGB PNG)")
        else:
            if mode not in ("L", "P"):
                raise DataError(path, f"label image has mode {mode!r}; expected a single-channel "
                                      f"(grayscale or palette) PNG of {encoding.description}")
            _load(im, path)
            raw = np.asarray(im)
    return encoding.to_train_ids(np.ascontiguousarray(raw), path)


def check_encoded_image(data: bytes, path: str | Path) -> None:
    """Cheap integrity check of an encoded PNG/JPEG (for decoders that fail a whole batch).

    PNG: walks the chunks and verifies their CRCs up to IEND. JPEG: start and end markers.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        pos = 8
        while True:
            if pos + 12 > len(data):
                raise DataError(path, "unreadable or truncated image: PNG ends before IEND")
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            kind = data[pos + 4:pos + 8]
            end = pos + 8 + length
            if end + 4 > len(data):
                raise DataError(path, f"unreadable or truncated image: PNG chunk {kind!r} "
                                      f"is cut off")
            (crc,) = struct.unpack(">I", data[end:end + 4])
            if zlib.crc32(data[pos + 4:end]) & 0xFFFFFFFF != crc:
                raise DataError(path, f"unreadable or truncated image: PNG chunk {kind!r} "
                                      f"fails its CRC")
            if kind == b"IEND":
                return
            pos = end + 4
    if data[:2] == b"\xff\xd8":
        if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
            raise DataError(path, "unreadable or truncated image: JPEG has no end marker")
        return
    try:  # any other format: let Pillow verify it
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for corrupt files
        raise DataError(path, f"not a readable image: {err}") from None
