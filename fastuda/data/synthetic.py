"""The built-in synthetic domain pair: procedural street scenes in three renderings.

Every image is a street seen from a car: sky, buildings along both sides (perspective facades with
windows), road with lane marks, sidewalks, grass, trees, poles with signs, cars and pedestrians,
placed with a pinhole camera 1.5 m above a flat ground plane. The layout sampler is shared; the
domains differ in how scenes are sampled and rendered:
- source: flat-shaded, saturated, clean colours (synthetic-looking), many pedestrians, few cars;
- target: textured materials (asphalt grain, paving, bricks, leaves, clouds), a palette moved
  TARGET_PALETTE_SHIFT (0.3) of the way to a realistic one (hazy sky, olive or autumn foliage,
  brick/concrete/glass buildings, muted cars), uneven illumination, a colour cast, gamma, blur and
  noise; more and larger cars (longer focal length), fewer pedestrians, more trees;
- night: the target's scenes at night: dark, blue cast, street-lamp and car-light glows, lit
  windows, strong noise.
The geometric cues (sky on top, road at the bottom converging to a vanishing point, object shapes)
are shared, so a model trained on the source transfers partly and self-training can improve it.
Measured with a 6-layer CNN trained from scratch on 64x64 source crops (200 iterations, images
rendered at 128x64): source val ~68 mIoU, target val 26.7 / 21.4 / ~15 mIoU for a palette shift
of 0.0 / 0.3 / 0.45-0.6; a nearest-class-mean colour classifier fit on source pixels scores 78% on
the source and 20% on the target (tests/data/test_data_synthetic.py).

Layout under ROOT (Cityscapes style, so the Cityscapes reader and both loaders read it):
  ROOT/<domain>/leftImg8bit/<split>/sceneNN/<domain>_<split>_NNNNNN_leftImg8bit.png   RGB
  ROOT/<domain>/gtFine/<split>/sceneNN/..._gtFine_labelTrainIds.png   train ids (uint8, 255 none)
  ROOT/<domain>/depth/<split>/sceneNN/..._depth.png   inverse depth, 16-bit grayscale PNG:
      inverse_depth [1/m] = value / 65535 (depth >= 1 m in every scene; value 0 = infinitely far,
      i.e. the sky; no pixel is invalid)
  ROOT/<domain>/class_stats_<split>.json   per-image class pixel counts (rare class sampling)
  ROOT/synthetic.json   marker written last: generator version, seed, image counts
Domains and splits: source/train, target/train, target/val, night/train, night/val.
Generation is deterministic per seed (every image draws from its own seeded generator), parallel,
and atomic (written to a temporary folder that is renamed into place).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from fastuda.data.classes import IGNORE_INDEX
from fastuda.data.io import DataError
from fastuda.data.stats import class_counts, write_class_stats

GENERATOR_VERSION = 3
WIDTH, HEIGHT = 256, 128
NUM_CLASSES = 19
DEFAULT_COUNTS: dict[str, dict[str, int]] = {
    "source": {"train": 400},
    "target": {"train": 400, "val": 100},
    "night": {"train": 200, "val": 100},
}
IMAGES_PER_SCENE_FOLDER = 50
CAMERA_HEIGHT = 1.5  # metres
MARKER = "synthetic.json"

# train ids used by the generator
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = (
    0, 1, 2, 5, 7, 8, 9, 10, 11, 13)

# material parts (how a pixel is painted) and the class each belongs to
PARTS = ("sky", "road", "lane", "sidewalk", "terrain", "wall", "window", "canopy", "trunk", "pole",
         "sign", "car_body", "car_window", "wheel", "car_light", "skin", "top", "bottom")
PART_ID = {name: i for i, name in enumerate(PARTS)}
PART_CLASS = {"sky": SKY, "road": ROAD, "lane": ROAD, "sidewalk": SIDEWALK, "terrain": TERRAIN,
              "wall": BUILDING, "window": BUILDING, "canopy": VEGETATION, "trunk": VEGETATION,
              "pole": POLE, "sign": SIGN, "car_body": CAR, "car_window": CAR, "wheel": CAR,
              "car_light": CAR, "skin": PERSON, "top": PERSON, "bottom": PERSON}


@dataclass(frozen=True)
class LayoutStyle:
    """How scenes of a domain are sampled (ranges are uniform)."""

    focal: tuple[float, float]  # focal length / image width
    horizon: tuple[float, float]  # horizon row / image height
    road_half: tuple[float, float]  # metres
    sidewalk: tuple[float, float]
    cars: tuple[int, int]
    car_scale: tuple[float, float]
    persons: tuple[int, int]
    trees: tuple[int, int]
    poles: tuple[int, int]
    sign_prob: float
    building_height: tuple[float, float]
    building_gap_prob: float
    terrain_prob: float


SOURCE_LAYOUT = LayoutStyle(focal=(0.5, 0.6), horizon=(0.40, 0.50), road_half=(3.5, 5.5),
                            sidewalk=(2.5, 4.0), cars=(1, 3), car_scale=(0.9, 1.1),
                            persons=(3, 7), trees=(1, 4), poles=(2, 5), sign_prob=0.6,
                            building_height=(8.0, 25.0), building_gap_prob=0.15,
                            terrain_prob=0.2)
TARGET_LAYOUT = LayoutStyle(focal=(0.65, 0.8), horizon=(0.36, 0.46), road_half=(3.0, 5.0),
                            sidewalk=(2.0, 3.5), cars=(3, 7), car_scale=(1.0, 1.3),
                            persons=(0, 3), trees=(3, 7), poles=(1, 4), sign_prob=0.4,
                            building_height=(6.0, 18.0), building_gap_prob=0.35,
                            terrain_prob=0.5)
DOMAIN_LAYOUT = {"source": SOURCE_LAYOUT, "target": TARGET_LAYOUT, "night": TARGET_LAYOUT}
DOMAIN_ID = {"source": 0, "target": 1, "night": 2}
SPLIT_ID = {"train": 0, "val": 1}


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
class Scene:
    """Per-pixel part instance, depth (m) and world coordinates of one generated layout."""

    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.inst = np.zeros((height, width), dtype=np.int32)  # instance 0: the sky
        self.depth = np.full((height, width), np.inf, dtype=np.float64)
        self.parts: list[int] = [PART_ID["sky"]]
        self.tones: list[float] = [0.5]
        ys, xs = np.mgrid[0:height, 0:width]
        self.ys = ys + 0.5  # pixel centres
        self.xs = xs + 0.5
        self.lamps: list[tuple[float, float, float]] = []  # (x, y, radius px) for night glows
        self.ground_x = np.zeros((height, width))  # world lateral / depth coords of the ground
        self.ground_z = np.zeros((height, width))

    def add(self, part: str, tone: float) -> int:
        self.parts.append(PART_ID[part])
        self.tones.append(float(tone))
        return len(self.parts) - 1

    def paint(self, mask: np.ndarray, part: str, tone: float, depth: float | np.ndarray,
              box: tuple[int, int, int, int] | None = None) -> None:
        """Paint ``mask`` (full-size, or the sub-array of ``box`` = y0, y1, x0, x1)."""
        k = self.add(part, tone)
        if box is None:
            self.inst[mask] = k
            self.depth[mask] = depth if np.isscalar(depth) else depth[mask]
            return
        y0, y1, x0, x1 = box
        self.inst[y0:y1, x0:x1][mask] = k
        self.depth[y0:y1, x0:x1][mask] = depth  # a scalar, or one value per masked pixel

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[int, int, int, int] | None:
        bx0, bx1 = max(0, int(np.floor(x0))), min(self.w, int(np.ceil(x1)) + 1)
        by0, by1 = max(0, int(np.floor(y0))), min(self.h, int(np.ceil(y1)) + 1)
        if bx0 >= bx1 or by0 >= by1:
            return None
        return by0, by1, bx0, bx1


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def make_scene(rng: np.random.Generator, style: LayoutStyle, width: int = WIDTH,
               height: int = HEIGHT) -> Scene:
    s = Scene(width, height)
    f = _u(rng, style.focal) * width
    yh = _u(rng, style.horizon) * height
    vx = width * rng.uniform(0.42, 0.58)
    hc = CAMERA_HEIGHT
    road_half = _u(rng, style.road_half)
    side_w = _u(rng, style.sidewalk)
    offset = rng.uniform(-1.0, 1.0)  # camera's lateral position relative to the road centre

    # ground plane: rows below the horizon
    ground = s.ys > yh + 0.5
    d = np.where(ground, s.ys - yh, 1.0)
    z_ground = f * hc / d
    x_ground = (s.xs - vx) * hc / d - offset
    s.ground_x, s.ground_z = x_ground, z_ground
    lateral = np.abs(x_ground)
    terrain_side = {side: rng.random() < style.terrain_prob for side in (-1, 1)}
    outer = road_half + side_w
    s.paint(ground, "terrain", rng.random(), z_ground)
    for side in (-1, 1):
        on_side = ground & (np.sign(x_ground) == side)
        if terrain_side[side]:  # grass strip between road and sidewalk
            strip = rng.uniform(1.0, 2.0)
            s.paint(on_side & (lateral >= road_half + strip) & (lateral < outer + strip),
                    "sidewalk", rng.random(), z_ground)
        else:
            s.paint(on_side & (lateral >= road_half) & (lateral < outer), "sidewalk",
                    rng.random(), z_ground)
    s.paint(ground & (lateral < road_half), "road", rng.random(), z_ground)
    dash = rng.uniform(2.0, 4.0)
    s.paint(ground & (np.abs(x_ground) < 0.12) & ((z_ground / dash) % 2 < 1), "lane", 0.5,
            z_ground)

    # facades along both sides: perspective wedges of buildings
    for side in (-1, 1):
        grass = rng.uniform(1.0, 2.0) if terrain_side[side] else 0.0
        facade_x = side * (outer + grass + rng.uniform(0.0, 1.5)) + offset  # camera coords
        cols = s.xs[0]
        rel = cols - vx
        valid = np.sign(rel) == np.sign(facade_x)
        z_col = np.where(valid, f * facade_x / np.where(rel == 0, 1e-6, rel), np.inf)
        z_col = np.where(valid & (z_col > 0), z_col, np.inf)
        z = 2.0
        segments = []
        while z < 120.0:
            length = rng.uniform(8.0, 25.0)
            if rng.random() >= style.building_gap_prob:
                segments.append((z, z + length, _u(rng, style.building_height), rng.random()))
            z += length + rng.uniform(0.0, 4.0)
        for z0, z1, height_m, tone in segments:
            in_seg = (z_col >= z0) & (z_col < z1)
            cols_in = np.flatnonzero(in_seg)
            if cols_in.size == 0:
                continue
            c0, c1 = cols_in[0], cols_in[-1] + 1  # the segment's columns are contiguous
            zc = z_col[c0:c1][None, :]
            ys = s.ys[:, c0:c1]
            top = yh - (height_m - hc) * f / zc
            bottom = yh + hc * f / zc
            mask = (ys >= top) & (ys < bottom)
            box = (0, s.h, c0, c1)
            depth = np.broadcast_to(zc, mask.shape)[mask]
            s.paint(mask, "wall", tone, depth, box)
            # windows: a grid in facade coordinates (metres along the street, height)
            height_at = hc - (ys - yh) * zc / f
            floor_h, bay = rng.uniform(2.8, 3.6), rng.uniform(2.5, 4.0)
            win = (mask & ((height_at % floor_h) > 0.35 * floor_h) & (height_at > 2.5)
                   & (height_at < height_m - 1.0) & (((zc - z0) % bay) > 0.45 * bay))
            s.paint(win, "window", rng.random(), np.broadcast_to(zc, win.shape)[win], box)

    # objects, painted far to near
    objects: list[tuple[float, str, dict[str, Any]]] = []
    for _ in range(rng.integers(style.trees[0], style.trees[1] + 1)):
        side = rng.choice((-1, 1))
        objects.append((rng.uniform(4.0, 60.0), "tree",
                        {"x": side * (outer - rng.uniform(0.3, 1.0)) + offset}))
    for _ in range(rng.integers(style.poles[0], style.poles[1] + 1)):
        side = rng.choice((-1, 1))
        objects.append((rng.uniform(4.0, 50.0), "pole",
                        {"x": side * (road_half + rng.uniform(0.3, 0.8)) + offset, "side": side,
                         "sign": rng.random() < style.sign_prob}))
    for _ in range(rng.integers(style.cars[0], style.cars[1] + 1)):
        lane = rng.choice((-1, 1)) * road_half / 2 + rng.uniform(-0.4, 0.4)
        objects.append((rng.uniform(5.0, 45.0), "car",
                        {"x": lane + offset, "scale": _u(rng, style.car_scale)}))
    for _ in range(rng.integers(style.persons[0], style.persons[1] + 1)):
        side = rng.choice((-1, 1))
        objects.append((rng.uniform(3.5, 35.0), "person",
                        {"x": side * (road_half + rng.uniform(0.4, max(0.5, side_w - 0.4)))
                         + offset}))
    objects.sort(key=lambda o: -o[0])
    for z, kind, params in objects:
        xc = vx + f * params["x"] / z
        yg = yh + f * hc / z
        px = f / z  # pixels per metre at this depth
        {"tree": _tree, "pole": _pole, "car": _car, "person": _person}[kind](
            s, rng, z, xc, yg, px, params)
    return s


def _rect(s: Scene, x0: float, x1: float, y0: float, y1: float, part: str, tone: float,
          z: float) -> None:
    # at least one pixel wide: thin far objects still show
    if x1 - x0 < 1.0:
        c = (x0 + x1) / 2
        x0, x1 = c - 0.5, c + 0.5
    b = s.box(x0, x1, y0, y1)
    if b is None:
        return
    y0i, y1i, x0i, x1i = b
    xs, ys = s.xs[y0i:y1i, x0i:x1i], s.ys[y0i:y1i, x0i:x1i]
    mask = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    s.paint(mask, part, tone, z, b)


def _ellipse(s: Scene, cx: float, cy: float, rx: float, ry: float, part: str, tone: float,
             z: float, bumps: np.ndarray | None = None) -> None:
    rx, ry = max(rx, 0.7), max(ry, 0.7)
    b = s.box(cx - 1.3 * rx, cx + 1.3 * rx, cy - 1.3 * ry, cy + 1.3 * ry)
    if b is None:
        return
    y0, y1, x0, x1 = b
    dx, dy = (s.xs[y0:y1, x0:x1] - cx) / rx, (s.ys[y0:y1, x0:x1] - cy) / ry
    r = np.hypot(dx, dy)
    limit = 1.0
    if bumps is not None:  # irregular outline: radius modulated by a few harmonics
        ang = np.arctan2(dy, dx)
        limit = 1.0 + sum(a * np.sin((k + 3) * ang + p) for k, (a, p) in enumerate(bumps))
    s.paint(r < limit, part, tone, z, b)


def _tree(s: Scene, rng: np.random.Generator, z: float, xc: float, yg: float, px: float,
          p: dict[str, Any]) -> None:
    trunk_h = rng.uniform(2.0, 3.0)
    _rect(s, xc - 0.15 * px, xc + 0.15 * px, yg - trunk_h * px, yg, "trunk", rng.random(), z)
    radius = rng.uniform(1.5, 3.0)
    cy = yg - (trunk_h + radius * 0.8) * px
    bumps = np.stack([rng.uniform(0.0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)
    _ellipse(s, xc, cy, radius * px, radius * 1.15 * px, "canopy", rng.random(), z, bumps)


def _pole(s: Scene, rng: np.random.Generator, z: float, xc: float, yg: float, px: float,
          p: dict[str, Any]) -> None:
    height = rng.uniform(5.0, 8.0)
    _rect(s, xc - 0.08 * px, xc + 0.08 * px, yg - height * px, yg, "pole", rng.random(), z)
    s.lamps.append((xc, yg - height * px, min(max(0.7 * px, 2.0), 10.0)))
    if p["sign"]:
        size = rng.uniform(0.6, 0.9)
        sy = yg - rng.uniform(2.3, 3.5) * px
        tone = rng.random()
        if rng.random() < 0.5:
            _rect(s, xc - size / 2 * px, xc + size / 2 * px, sy - size * px, sy, "sign", tone,
                  z - 0.05)
        else:
            _ellipse(s, xc, sy - size / 2 * px, size / 2 * px, size / 2 * px, "sign", tone,
                     z - 0.05)


def _car(s: Scene, rng: np.random.Generator, z: float, xc: float, yg: float, px: float,
         p: dict[str, Any]) -> None:
    k = p["scale"]
    w, h = 1.8 * k * px, 1.5 * k * px
    tone = rng.random()
    _rect(s, xc - w / 2, xc + w / 2, yg - 0.6 * h, yg - 0.12 * h, "car_body", tone, z)
    _rect(s, xc - 0.4 * w, xc + 0.4 * w, yg - h, yg - 0.6 * h + 1, "car_body", tone, z)
    _rect(s, xc - 0.33 * w, xc + 0.33 * w, yg - 0.92 * h, yg - 0.64 * h, "car_window",
          rng.random(), z)
    for sx in (-1, 1):
        _rect(s, xc + sx * 0.42 * w - 0.1 * w, xc + sx * 0.42 * w + 0.1 * w, yg - 0.2 * h, yg,
              "wheel", rng.random(), z)
        _rect(s, xc + sx * 0.4 * w - 0.06 * w, xc + sx * 0.4 * w + 0.06 * w, yg - 0.5 * h,
              yg - 0.42 * h, "car_light", 0.5, z)
        s.lamps.append((xc + sx * 0.4 * w, yg - 0.46 * h, min(max(0.25 * px, 1.0), 5.0)))


def _person(s: Scene, rng: np.random.Generator, z: float, xc: float, yg: float, px: float,
            p: dict[str, Any]) -> None:
    h = rng.uniform(1.55, 1.9) * px
    w = 0.28 * h
    _rect(s, xc - 0.45 * w, xc - 0.05 * w, yg - 0.47 * h, yg, "bottom", rng.random(), z)
    _rect(s, xc + 0.05 * w, xc + 0.45 * w, yg - 0.47 * h, yg, "bottom", rng.random(), z)
    _rect(s, xc - w / 2, xc + w / 2, yg - 0.85 * h, yg - 0.45 * h, "top", rng.random(), z)
    _ellipse(s, xc, yg - 0.92 * h, 0.075 * h, 0.08 * h, "skin", rng.random(), z)


def scene_labels(s: Scene) -> np.ndarray:
    part_class = np.array([PART_CLASS[p] for p in PARTS], dtype=np.uint8)
    return part_class[np.asarray(s.parts)[s.inst]]


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
# per part: colour choices (a tone in [0, 1) picks one) and jitter
SOURCE_COLOURS: dict[str, list[tuple[int, int, int]]] = {
    "sky": [(120, 175, 235)], "road": [(105, 105, 110)], "lane": [(235, 235, 235)],
    "sidewalk": [(190, 165, 175)], "terrain": [(135, 190, 75)],
    "wall": [(205, 185, 140), (160, 160, 172), (195, 125, 95), (125, 140, 165)],
    "window": [(95, 130, 165)], "canopy": [(55, 160, 45)], "trunk": [(120, 85, 50)],
    "pole": [(85, 85, 90)], "sign": [(240, 205, 0), (20, 75, 205), (225, 30, 30)],
    "car_body": [(210, 30, 30), (30, 60, 210), (235, 205, 40), (245, 245, 245), (40, 40, 40),
                 (30, 160, 60)],
    "car_window": [(50, 70, 95)], "wheel": [(20, 20, 20)], "car_light": [(255, 60, 60)],
    "skin": [(235, 185, 145), (170, 120, 85)],
    "top": [(220, 40, 40), (40, 90, 220), (240, 200, 30), (40, 170, 80), (230, 120, 30)],
    "bottom": [(40, 40, 130), (60, 60, 60), (130, 110, 80)],
}
TARGET_COLOURS: dict[str, list[tuple[int, int, int]]] = {
    "sky": [(205, 208, 212), (185, 195, 205)], "road": [(72, 68, 64), (88, 84, 78)],
    "lane": [(200, 195, 170)], "sidewalk": [(158, 150, 134), (135, 132, 126)],
    "terrain": [(118, 112, 68), (95, 105, 60)],
    "wall": [(140, 78, 58), (172, 170, 160), (92, 112, 132), (120, 100, 85)],
    "window": [(38, 44, 54), (70, 85, 100)], "canopy": [(52, 82, 34), (68, 92, 40), (150, 105, 38)],
    "trunk": [(70, 55, 40)], "pole": [(132, 136, 140)],
    "sign": [(30, 90, 180), (235, 235, 235), (195, 45, 40)],
    "car_body": [(150, 150, 156), (48, 54, 70), (108, 32, 30), (205, 205, 198), (26, 26, 28),
                 (60, 75, 60)],
    "car_window": [(28, 32, 38)], "wheel": [(35, 35, 35)], "car_light": [(200, 120, 60)],
    "skin": [(200, 150, 120), (120, 85, 60)],
    "top": [(60, 60, 72), (92, 52, 42), (42, 72, 52), (122, 112, 92), (150, 150, 150)],
    "bottom": [(30, 30, 36), (70, 62, 50), (40, 48, 70)],
}
TARGET_PALETTE_SHIFT = 0.3
# texture amplitude and noise cell size (pixels) per part in the target rendering
TARGET_TEXTURE: dict[str, tuple[float, int]] = {
    "sky": (0.06, 24), "road": (0.22, 1), "lane": (0.15, 1), "sidewalk": (0.10, 2),
    "terrain": (0.30, 2), "wall": (0.12, 2), "window": (0.25, 3), "canopy": (0.45, 2),
    "trunk": (0.2, 1), "car_body": (0.05, 4),
}


def _colour_table(s: Scene, palette: dict[str, list[tuple[int, int, int]]],
                  rng: np.random.Generator, jitter: float) -> np.ndarray:
    table = np.zeros((len(s.parts), 3))
    for i, (part, tone) in enumerate(zip(s.parts, s.tones, strict=True)):
        choices = palette[PARTS[part]]
        base = np.array(choices[min(int(tone * len(choices)), len(choices) - 1)], dtype=float)
        table[i] = base * (1 + jitter * rng.uniform(-1, 1)) + rng.uniform(-jitter, jitter, 3) * 40
    return table


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [-1, 1] with features of about ``cell`` pixels."""
    if cell <= 1:
        return rng.uniform(-1, 1, (h, w))
    gh, gw = h // cell + 2, w // cell + 2
    grid = Image.fromarray(rng.uniform(-1, 1, (gh, gw)).astype(np.float32), mode="F")
    big = np.asarray(grid.resize((gw * cell, gh * cell), Image.Resampling.BICUBIC))
    return np.clip(big[:h, :w], -1, 1)


def render_source(s: Scene, rng: np.random.Generator) -> np.ndarray:
    img = _colour_table(s, SOURCE_COLOURS, rng, 0.04)[s.inst]
    sky = s.inst == 0  # gentle flat gradient: lighter towards the horizon
    img[sky] *= (0.85 + 0.25 * s.ys[sky] / s.h)[:, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _target_base(s: Scene, rng: np.random.Generator) -> np.ndarray:
    h, w = s.h, s.w
    # the target palette is a blend of the source's and a realistic one: a shift a model trained
    # on the source survives in part (full strength leaves a source-only model with almost nothing)
    table = ((1 - TARGET_PALETTE_SHIFT) * _colour_table(s, SOURCE_COLOURS, rng, 0.04)
             + TARGET_PALETTE_SHIFT * _colour_table(s, TARGET_COLOURS, rng, 0.08))
    img = table[s.inst]
    part = np.asarray(s.parts)[s.inst]
    for name, (amp, cell) in TARGET_TEXTURE.items():
        mask = part == PART_ID[name]
        if mask.any():
            tex = _smooth_noise(rng, h, w, cell)
            img[mask] *= (1 + amp * tex[mask])[:, None]
    # paving joints on sidewalks and bricks on the walls, in world coordinates
    side = part == PART_ID["sidewalk"]
    tile = rng.uniform(0.5, 0.9)
    joints = ((s.ground_x % tile) < 0.06 * tile) | ((s.ground_z % tile) < 0.08 * tile)
    img[side & joints] *= 0.7
    wall = part == PART_ID["wall"]
    course = max(1, int(rng.integers(2, 4)))
    img[wall & ((s.ys.astype(int) % (course + 1)) == 0)] *= 0.8
    # sky: clouds
    sky = s.inst == 0
    clouds = np.clip(_smooth_noise(rng, h, w, 16), 0, 1)
    img[sky] = img[sky] * (1 - 0.3 * clouds[sky, None]) + 240 * 0.3 * clouds[sky, None]
    return img


def _finish(img: np.ndarray, rng: np.random.Generator, noise_std: float, blur: float
            ) -> np.ndarray:
    img = np.clip(img, 0, 255)
    if blur > 0:
        pil = Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
        img = np.asarray(pil).astype(np.float64)
    img = img + rng.normal(0, noise_std, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_target(s: Scene, rng: np.random.Generator) -> np.ndarray:
    h, w = s.h, s.w
    img = _target_base(s, rng)
    # uneven illumination: large soft shadows and a sun gradient across the image
    shade = 0.8 + 0.25 * _smooth_noise(rng, h, w, 48)
    direction = rng.uniform(-1, 1)
    shade *= 1 + 0.2 * direction * (s.xs / w - 0.5)
    img *= shade[..., None]
    # colour cast and gamma
    cast = np.array([rng.uniform(1.0, 1.2), rng.uniform(0.92, 1.05), rng.uniform(0.7, 0.9)])
    if rng.random() < 0.4:  # some images cold instead of warm
        cast = cast[::-1]
    img = img * cast
    gamma = rng.uniform(0.8, 1.25)
    img = 255 * (np.clip(img, 0, 255) / 255) ** gamma
    return _finish(img, rng, rng.uniform(4.0, 9.0), rng.uniform(0.5, 1.1))


def render_night(s: Scene, rng: np.random.Generator) -> np.ndarray:
    h, w = s.h, s.w
    img = _target_base(s, rng) * rng.uniform(0.18, 0.3)
    img *= np.array([0.7, 0.8, 1.25])
    part = np.asarray(s.parts)[s.inst]
    sky = s.inst == 0
    img[sky] = np.array([12, 16, 34]) * (1 + 0.3 * s.ys[sky, None] / h)
    lit = (part == PART_ID["window"]) & (_smooth_noise(rng, h, w, 6) > 0.3)
    img[lit] = np.array([230, 190, 110]) * rng.uniform(0.6, 1.0)
    img[part == PART_ID["car_light"]] = (255, 70, 50)
    glow = np.zeros((h, w))
    for x, y, radius in s.lamps:
        r = radius * rng.uniform(0.8, 1.5)
        b = s.box(x - 3 * r, x + 3 * r, y - 3 * r, y + 3 * r)
        if b is None:
            continue
        y0, y1, x0, x1 = b
        glow[y0:y1, x0:x1] += np.exp(-((s.xs[y0:y1, x0:x1] - x) ** 2
                                       + (s.ys[y0:y1, x0:x1] - y) ** 2) / (2 * r * r))
    img += np.clip(glow, 0, 1.2)[..., None] * np.array([170, 140, 90])
    return _finish(img, rng, rng.uniform(8.0, 14.0), rng.uniform(0.8, 1.3))


RENDERERS = {"source": render_source, "target": render_target, "night": render_night}


def inverse_depth_png(depth: np.ndarray) -> np.ndarray:
    """uint16 inverse depth: value / 65535 = 1 / depth in 1/m (depth >= 1 m; sky -> 0)."""
    inv = np.where(np.isfinite(depth), 1.0 / np.maximum(depth, 1.0), 0.0)
    return np.round(inv * 65535).astype(np.uint16)


def generate_sample(domain: str, split: str, index: int, seed: int = 0, width: int = WIDTH,
                    height: int = HEIGHT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, label uint8 HxW train ids, inverse depth uint16 HxW) of one sample."""
    rng = np.random.default_rng([seed, DOMAIN_ID[domain], SPLIT_ID[split], index])
    scene = make_scene(rng, DOMAIN_LAYOUT[domain], width, height)
    image = RENDERERS[domain](scene, rng)
    return image, scene_labels(scene), inverse_depth_png(scene.depth)


# ----------------------------------------------------------------------------------------------
# Writing the tree
# ----------------------------------------------------------------------------------------------
def sample_paths(root: Path, domain: str, split: str, index: int) -> tuple[Path, Path, Path]:
    scene = f"scene{index // IMAGES_PER_SCENE_FOLDER:02d}"
    stem = f"{domain}_{split}_{index:06d}"
    base = root / domain
    return (base / "leftImg8bit" / split / scene / f"{stem}_leftImg8bit.png",
            base / "gtFine" / split / scene / f"{stem}_gtFine_labelTrainIds.png",
            base / "depth" / split / scene / f"{stem}_depth.png")


def _write_one(args: tuple[str, str, str, int, int, int, int]) -> tuple[str, list[int]]:
    root, domain, split, index, seed, width, height = args
    image, label, inv_depth = generate_sample(domain, split, index, seed, width, height)
    paths = sample_paths(Path(root), domain, split, index)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(paths[0])
    Image.fromarray(label).save(paths[1])
    Image.fromarray(inv_depth).save(paths[2])
    return str(paths[0].relative_to(Path(root) / domain)), class_counts(label, NUM_CLASSES)


def generate_synthetic(root: str | Path, *, seed: int = 0,
                       counts: dict[str, dict[str, int]] | None = None, width: int = WIDTH,
                       height: int = HEIGHT, workers: int | None = None,
                       progress: bool = False) -> None:
    """Generate the pair into ``root`` (replacing a previous generated tree; atomic)."""
    root = Path(root)
    counts = counts or DEFAULT_COUNTS
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    jobs = [(str(tmp), domain, split, i, seed, width, height)
            for domain, splits in counts.items() for split, n in splits.items() for i in range(n)]
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    stats: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(_progress(pool.map(_write_one, jobs, chunksize=16), len(jobs),
                                     progress))
    else:
        results = list(_progress(map(_write_one, jobs), len(jobs), progress))
    for job, (rel, c) in zip(jobs, results, strict=True):
        stats.setdefault((job[1], job[2]), {})[rel] = {"size": [height, width], "counts": c}
    for (domain, split), images in stats.items():
        write_class_stats(tmp / domain / f"class_stats_{split}.json", images, NUM_CLASSES)
    marker = {"format": "fastuda-synthetic", "version": GENERATOR_VERSION, "seed": seed,
              "size": [width, height], "counts": counts}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    if root.exists():
        if not _is_generated(root):
            shutil.rmtree(tmp)
            raise FileExistsError(f"{root} exists and is not a fastuda synthetic tree; "
                                  f"refusing to replace it")
        shutil.rmtree(root)
    os.replace(tmp, root)


def _progress(it: Any, total: int, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():  # no bar redrawn into a log file or a pipe
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="synthetic pair", unit="img")


def _is_generated(root: Path) -> bool:
    return (root / MARKER).is_file() or not any(root.iterdir())


def _read_marker(root: Path) -> dict[str, Any]:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def synthetic_complete(root: str | Path) -> bool:
    """The marker says this generator version wrote the tree, and every image is there."""
    root = Path(root)
    marker = _read_marker(root)
    if marker.get("version") != GENERATOR_VERSION:
        return False
    for domain, splits in marker.get("counts", {}).items():
        for split, n in splits.items():
            folder = root / domain / "leftImg8bit" / split
            if sum(1 for _ in folder.glob("*/*_leftImg8bit.png")) != n:
                return False
            if not (root / domain / f"class_stats_{split}.json").is_file():
                return False
    return True


def ensure_synthetic(root: str) -> None:
    """Generate the synthetic pair under ``root`` unless a complete one is there (cheap check).

    Safe to call from several processes at once (a file lock serialises generation).
    """
    path = Path(root).expanduser()
    if synthetic_complete(path):
        return
    if path.exists() and not path.is_dir():
        raise DataError(path, "is a file; the synthetic dataset root must be a folder")
    if path.is_dir() and not (path / MARKER).is_file() and any(path.iterdir()):
        # generating into someone else's folder would mix trees (and fail half-way)
        raise DataError(path, f"is a non-empty folder that holds no synthetic dataset (no "
                              f"{MARKER}); choose an empty or new folder as its root")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not synthetic_complete(path):
                # an incomplete tree of this generator is rebuilt with its own settings
                kwargs: dict[str, Any] = {}
                marker = _read_marker(path)
                if marker.get("version") == GENERATOR_VERSION:
                    kwargs = {"seed": marker["seed"], "counts": marker["counts"],
                              "width": marker["size"][0], "height": marker["size"][1]}
                if not sys.stderr.isatty():  # a log gets one line, a terminal the bar
                    print(f"generating the synthetic domain pair under {path}", file=sys.stderr,
                          flush=True)
                generate_synthetic(path, progress=True, **kwargs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


__all__ = ["ensure_synthetic", "generate_synthetic", "generate_sample", "synthetic_complete",
           "IGNORE_INDEX"]
