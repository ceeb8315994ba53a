"""``python -m fastuda.predict``: a folder of mixed sizes and formats, bad files named and skipped,
predictions that agree with evaluate's, and the Cityscapes / Dark Zurich test-server layouts
checked against cityscapesscripts."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastuda.config import load_config
from fastuda.data import build_val_loader, ensure_synthetic
from fastuda.data.loaders import normalise
from fastuda.engine.metrics import ConfusionMatrix
from fastuda.evaluate import evaluate, predict
from fastuda.models import build_network
from fastuda.predict import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.toml"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny DeepLab-V2 (random weights, seeded: varied predictions) and its config."""
    root = REPO / "data" / "synthetic"
    ensure_synthetic(str(root))
    sets = ["model.embed_dim=16", "data.num_workers=0", "train.device='cpu'",
            f"data.val.root={str(root)!r}"]
    cfg = load_config(CONFIG, sets)
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    ckpt = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save({"trainer": {"student": net.state_dict(), "teacher": net.state_dict()}}, ckpt)
    vals = sorted((root / "target" / "leftImg8bit" / "val").glob("*/*.png"))
    args = [str(CONFIG), "--checkpoint", str(ckpt), *(x for s in sets for x in ("--set", s))]
    return {"cfg": cfg, "net": net, "args": args, "vals": vals}


def _png_16bit_rgb(path: Path, h: int, w: int) -> None:
    """A valid 16-bit RGB PNG (Pillow cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + bytes(range(256))[: 6 * w].ljust(6 * w, b"\x01") for _ in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2,
                                                                     0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _reference(run: dict, image: np.ndarray) -> torch.Tensor:
    """evaluate's inference on one RGB image: the class ids."""
    cfg = run["cfg"]
    x = normalise(torch.from_numpy(image).permute(2, 0, 1)[None], cfg.data.mean, cfg.data.std)
    return predict(run["net"], x, cfg.eval, cfg.model.num_classes).argmax(1)[0]


def test_folder_of_mixed_images(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                ) -> None:
    from cityscapesscripts.helpers.labels import trainId2label

    vals = run["vals"]
    inp = tmp_path / "in"
    (inp / "city" / "deep").mkdir(parents=True)
    shutil.copy(vals[0], inp / "city" / "a.png")  # the val images, unchanged
    shutil.copy(vals[1], inp / "city" / "deep" / "b.png")
    src = Image.open(vals[2]).convert("RGB")
    src.save(inp / "c.jpg", quality=92)
    src.resize((133, 75)).convert("L").save(inp / "grey_odd.png")  # odd size, greyscale
    src.resize((96, 160)).convert("RGBA").save(inp / "rgba_tall.png")  # portrait, alpha
    src.resize((120, 64)).convert("P").save(inp / "palette.png")
    # bad files: each is named and skipped
    (inp / "empty.png").write_bytes(b"")
    (inp / "notes.png").write_text("not an image")
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(inp / "grey16.png")
    _png_16bit_rgb(inp / "rgb16.png", 8, 8)
    src.convert("CMYK").save(inp / "cmyk.jpg")
    data = (inp / "city" / "a.png").read_bytes()
    (inp / "cut.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    bad = {"empty.png": "empty file", "notes.png": "not a readable image",
           "grey16.png": "16-bit", "rgb16.png": "16-bit", "cmyk.jpg": "CMYK",
           "cut.png": "truncated"}

    out = tmp_path / "out"
    rc = main([*run["args"], "--input", str(inp), "--output", str(out), "--batch-size", "2",
               "--confidence", "--logits"])
    captured = capsys.readouterr()
    assert rc == 1  # some inputs failed
    for name, problem in bad.items():
        lines = [ln for ln in captured.err.splitlines() if str(inp / name) in ln]
        assert len(lines) == 1 and lines[0].startswith("error:") and problem in lines[0], \
            (name, captured.err)
        assert not list(out.rglob(Path(name).stem + "_*"))
    assert "predicted 6 image(s)" in captured.out and "6 skipped" in captured.out
    assert "Traceback" not in captured.err

    good = {"city/a": vals[0], "city/deep/b": vals[1], "c": inp / "c.jpg",
            "grey_odd": inp / "grey_odd.png", "rgba_tall": inp / "rgba_tall.png",
            "palette": inp / "palette.png"}
    for name, path in good.items():
        image = np.array(Image.open(path).convert("RGB"))
        ids = np.array(Image.open(out / f"{name}_trainIds.png"))
        colour = np.array(Image.open(out / f"{name}_color.png"))
        ov = Image.open(out / f"{name}_overlay.jpg")
        conf = np.array(Image.open(out / f"{name}_confidence.png"))
        logits = np.load(out / f"{name}_logits.npy")
        h, w = image.shape[:2]
        assert ids.shape == (h, w) and ids.dtype == np.uint8 and colour.shape == (h, w, 3)
        assert ov.size == (w, h) and ov.format == "JPEG"
        # the colours are Cityscapes' for the predicted train ids
        lut = np.array([trainId2label[t].color for t in range(19)], dtype=np.uint8)
        assert (colour == lut[ids]).all()
        # evaluate's inference on the same pixels gives the same classes
        assert (ids == _reference(run, image).numpy()).all(), name
        assert conf.dtype == np.uint16 or Image.open(out / f"{name}_confidence.png").mode \
            .startswith("I;16")
        assert logits.dtype == np.float16 and logits.shape == (19, h, w)
        prob = torch.from_numpy(logits.astype(np.float32)).softmax(0)
        assert (prob.argmax(0).numpy() == ids).mean() > 0.99  # fp16 rounding may break ties
        assert np.abs(prob.max(0).values.numpy() - conf / 65535).max() < 5e-3
    assert len(np.unique(np.array(Image.open(out / "city/a_trainIds.png")))) >= 2


def test_predictions_score_as_evaluate_does(run: dict, tmp_path: Path) -> None:
    """The val images predicted from their files: the mIoU of those predictions against the
    labels equals evaluate()'s on the same images."""
    cfg = run["cfg"]
    n = 3
    inp = tmp_path / "in"
    inp.mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("# three val images\n" + "\n".join(str(p) for p in run["vals"][:n]) + "\n")
    assert main([*run["args"], "--input", str(listing), "--output", str(tmp_path / "out")]) == 0
    conf = ConfusionMatrix(19)
    loader = build_val_loader(cfg.data)
    for k, batch in enumerate(loader):
        if k == n:
            break
        ids = np.array(Image.open(tmp_path / "out" / f"{run['vals'][k].stem}_trainIds.png"))
        conf.update(torch.from_numpy(ids).long()[None], batch["label"])
    cfg.eval.max_images = n
    record = evaluate(run["net"], build_val_loader(cfg.data), cfg, torch.device("cpu"))
    cfg.eval.max_images = 0
    assert round(100 * conf.miou(), 4) == record["mIoU"]


def test_refusals(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(run["vals"][0], inp / "a.png")
    (inp / "b.png").write_bytes(b"")
    base = [*run["args"], "--input", str(inp)]
    # an output folder inside the input folder
    assert main([*base, "--output", str(inp / "pred")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "inside the input folder" in err and not (inp / "pred"
                                                                                  ).exists()
    # --strict stops at the first bad file, naming it
    assert main([*base, "--output", str(tmp_path / "strict"), "--strict"]) == 1
    err = capsys.readouterr().err
    assert f"error: {inp / 'b.png'}: empty file" in err
    assert not (tmp_path / "strict" / "a_trainIds.png").exists()
    # existing outputs are kept unless --overwrite
    out = tmp_path / "out"
    assert main([*base, "--output", str(out)]) == 1  # b.png fails
    capsys.readouterr()
    (inp / "b.png").unlink()
    before = (out / "a_trainIds.png").stat().st_mtime_ns
    assert main([*base, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert (out / "a_trainIds.png").stat().st_mtime_ns == before
    assert main([*base, "--output", str(out), "--overwrite"]) == 0
    # a missing input path and two inputs that would write the same name
    assert main([*run["args"], "--input", str(tmp_path / "nope"), "--output", str(out)]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run["vals"][1], other / "a.png")
    assert main([*run["args"], "--input", str(inp / "a.png"), str(other / "a.png"), "--output",
                 str(tmp_path / "clash")]) == 1
    assert "would both be written" in capsys.readouterr().err


def test_cityscapes_test_server_format(run: dict, tmp_path: Path) -> None:
    """Label ids as cityscapesscripts defines them, in files its evaluation script finds."""
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    from cityscapesscripts.helpers.labels import id2label

    inp = tmp_path / "leftImg8bit" / "test"
    names = ["berlin/berlin_000000_000019_leftImg8bit", "bonn/bonn_000004_000019_leftImg8bit"]
    for name, src in zip(names, run["vals"], strict=False):
        (inp / name).parent.mkdir(parents=True)
        shutil.copy(src, inp / f"{name}.png")
    sub, plain = tmp_path / "submit", tmp_path / "plain"
    assert main([*run["args"], "--input", str(inp), "--output", str(sub), "--format",
                 "cityscapes"]) == 0
    assert main([*run["args"], "--input", str(inp), "--output", str(plain)]) == 0
    assert sorted(p.relative_to(sub).as_posix() for p in sub.rglob("*.png")) == \
        sorted(f"{n}.png" for n in names)  # nothing else in the submission folder
    args = ev.args
    args.predictionPath, args.predictionWalk = str(sub), None
    for name in names:
        city, stem = name.split("/")
        gt = f"gtFine/test/{city}/{stem.replace('leftImg8bit', 'gtFine_labelIds')}.png"
        found = Path(ev.getPrediction(args, gt))
        assert found == sub / f"{name}.png"
        ids = np.array(Image.open(found))
        train = np.array(Image.open(plain / f"{name}_trainIds.png"))
        as_train = np.vectorize(lambda i: id2label[int(i)].trainId)(ids)
        assert (as_train == train).all()
        assert all(not id2label[int(i)].ignoreInEval for i in np.unique(ids))


def test_dark_zurich_test_server_format(run: dict, tmp_path: Path) -> None:
    # the three folders of the Dark Zurich / ACDC servers (BIT-DA/SePiCo README.md, "Evaluation
    # on Dark Zurich"), flat, each file named as the input image; confidence uint16 = p x 65535
    inp = tmp_path / "rgb_anon" / "test" / "night"
    names = ["GOPR0356/GOPR0356_frame_000321_rgb_anon", "GOPR0364/GOPR0364_frame_000001_rgb_anon"]
    for name, src in zip(names, run["vals"], strict=False):
        (inp / name).parent.mkdir(parents=True)
        shutil.copy(src, inp / f"{name}.png")
    sub, plain = tmp_path / "submit", tmp_path / "plain"
    assert main([*run["args"], "--input", str(inp), "--output", str(sub), "--format",
                 "darkzurich", "--invalid-below", "0.2"]) == 0
    assert main([*run["args"], "--input", str(inp), "--output", str(plain),
                 "--confidence"]) == 0
    assert sorted(p.name for p in sub.iterdir()) == \
        ["confidence", "labelTrainIds", "labelTrainIds_invalid"]
    for folder in ("confidence", "labelTrainIds", "labelTrainIds_invalid"):
        assert sorted(p.name for p in (sub / folder).iterdir()) == \
            sorted(Path(n).name + ".png" for n in names)
    for name in names:
        base = Path(name).name + ".png"
        train = np.array(Image.open(plain / f"{name}_trainIds.png"))
        conf_im = Image.open(sub / "confidence" / base)
        assert conf_im.mode.startswith("I;16")
        conf = np.array(conf_im).astype(np.int64)
        assert (np.array(Image.open(sub / "labelTrainIds" / base)) == train).all()
        assert (conf == np.array(Image.open(plain / f"{name}_confidence.png"))).all()
        invalid = np.array(Image.open(sub / "labelTrainIds_invalid" / base))
        low = conf < 0.2 * 65535 - 1  # away from the threshold's rounding
        high = conf > 0.2 * 65535 + 1
        assert low.any() and high.any()
        assert (invalid[low] == 255).all() and (invalid[high] == train[high]).all()


def test_a_vit_predicts_images_of_any_size(tmp_path: Path) -> None:
    """configs/demo_vit.toml (DINOv2 ViT-S/14, random weights): predict pads each image to the
    patch grid and writes ids of the image's own size, equal to evaluate's inference."""
    root = REPO / "data" / "synthetic"
    ensure_synthetic(str(root))
    config = REPO / "configs" / "demo_vit.toml"
    sets = ["data.num_workers=0", "train.device='cpu'", f"data.val.root={str(root)!r}"]
    cfg = load_config(config, sets)
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    ckpt = tmp_path / "weights.pt"
    torch.save({"trainer": {"student": net.state_dict(), "teacher": net.state_dict()}}, ckpt)
    src = Image.open(sorted((root / "target" / "leftImg8bit" / "val").glob("*/*.png"))[0])
    inp = tmp_path / "in"
    inp.mkdir()
    src.convert("RGB").save(inp / "whole.png")  # 256 x 128: not a multiple of 14
    src.convert("RGB").resize((75, 61)).save(inp / "odd.png")
    out = tmp_path / "out"
    assert main([str(config), "--checkpoint", str(ckpt), *(x for s in sets for x in ("--set", s)),
                 "--input", str(inp), "--output", str(out)]) == 0
    run = {"cfg": cfg, "net": net}
    for name in ("whole", "odd"):
        image = np.array(Image.open(inp / f"{name}.png"))
        ids = np.array(Image.open(out / f"{name}_trainIds.png"))
        assert ids.shape == image.shape[:2]
        assert (ids == _reference(run, image).numpy()).all(), name
