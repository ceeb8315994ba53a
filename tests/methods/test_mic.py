"""MIC: the block masks (ratio, block size, drawn from the step's generator, identical after a
checkpoint round trip), the masked pass's input and loss by hand, MIC in the loop and stacked
with SePiCo (both methods' losses in metrics.jsonl), and DDP with MIC's extra pass (one
all-reduce per step). SIGKILL resume with MIC: tests/test_train.py (configs/demo_sepico_mic.toml);
every config loads: tests/test_config.py."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from fastuda.config import ConfigError, load_config
from fastuda.data import ensure_synthetic
from fastuda.data.augment import strong_augment
from fastuda.engine.context import MethodContext, StepView
from fastuda.engine.distributed import DistInfo, wrap_student
from fastuda.engine.self_training import SelfTraining
from fastuda.methods import build_methods
from fastuda.methods.mic import MIC, MICSettings, block_mask
from fastuda.models import build_network
from fastuda.train import train

REPO = Path(__file__).resolve().parents[2]
DEMO_MIC = REPO / "configs" / "demo_mic.toml"
DEMO_SEPICO_MIC = REPO / "configs" / "demo_sepico_mic.toml"


# ----------------------------------------------------------------------------------------------
# The mask
# ----------------------------------------------------------------------------------------------
def test_block_mask_is_rand_over_blocks_above_the_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    m = block_mask(4, 256, 512, block_size=8, ratio=0.7, generator=g)
    assert m.shape == (4, 1, 256, 512) and set(m.unique().tolist()) <= {0.0, 1.0}
    cells = m[:, :, ::8, ::8]  # one value per 8x8 block
    assert cells.shape == (4, 1, 32, 64)
    # every pixel carries its block's value: square blocks of block_size pixels
    assert torch.equal(m, cells.repeat_interleave(8, 2).repeat_interleave(8, 3))
    # the blocks are rand(B, 1, H/b, W/b) > ratio, from the generator's stream
    g.set_state(state)
    assert torch.equal(cells, (torch.rand(4, 1, 32, 64, generator=g) > 0.7).float())
    # 8192 blocks, each kept with probability 0.3 (std of the share 0.005)
    assert abs(float(cells.mean()) - 0.3) < 0.02
    # the released HRDA setting: blocks of 64 on a 1024 crop -> 16 x 16 blocks
    m64 = block_mask(1, 1024, 1024, block_size=64, ratio=0.7, generator=g)
    c64 = m64[:, :, ::64, ::64]
    assert c64.shape == (1, 1, 16, 16)
    assert torch.equal(m64, c64.repeat_interleave(64, 2).repeat_interleave(64, 3))


def test_block_mask_comes_from_its_generator_only() -> None:
    torch.manual_seed(1)
    a = block_mask(2, 64, 64, block_size=16, ratio=0.5,
                   generator=torch.Generator().manual_seed(5))
    torch.manual_seed(2)  # the global RNG plays no part
    g = torch.Generator().manual_seed(5)
    b = block_mask(2, 64, 64, block_size=16, ratio=0.5, generator=g)
    assert torch.equal(a, b)
    assert not torch.equal(b, block_mask(2, 64, 64, block_size=16, ratio=0.5, generator=g))


# ----------------------------------------------------------------------------------------------
# The pass: input and loss against hand-built computations
# ----------------------------------------------------------------------------------------------
def view_of(target: torch.Tensor, label: torch.Tensor | None = None,
            weight: torch.Tensor | None = None) -> StepView:
    B = target.shape[0]
    return StepView(0, {}, {}, source_image=torch.zeros_like(target),
                    source_label=torch.zeros(B, *target.shape[-2:], dtype=torch.long),
                    target_image=target, pseudo_label=label, pseudo_weight=weight)


def test_masked_images_are_the_augmented_target_times_the_blocks() -> None:
    ctx = MethodContext(num_classes=3, generator=torch.Generator().manual_seed(3))
    mic = MIC(MICSettings(block_size=4, mask_ratio=0.5), ctx)
    target = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    state = ctx.generator.get_state()
    got = mic.masked_images(view_of(target))
    # by hand, from the same generator state: the strong augmentation, then the blocks
    g = torch.Generator()
    g.set_state(state)
    st = ctx.self_training
    aug = strong_augment(target, mean=ctx.mean, std=ctx.std, generator=g,
                         jitter_strength=st.color_jitter_strength,
                         jitter_prob=st.color_jitter_prob, blur_prob=st.blur_prob,
                         blur_sigma=tuple(st.blur_sigma))
    keep = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    keep = keep.repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.equal(got, aug * keep)
    assert 0 < float(keep.mean()) < 1  # some blocks masked, some kept
    # without the colour augmentation: the target itself, masked
    plain = MIC(MICSettings(block_size=4, mask_ratio=0.5, augment=False), ctx)
    g.set_state(ctx.generator.get_state())
    keep = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    assert torch.equal(plain.masked_images(view_of(target)),
                       target * keep.repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_masked_loss_is_the_weighted_ce_on_the_pseudo_labels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g)  # output stride 2 on 8x8 labels
    label = torch.randint(0, 3, (2, 8, 8), generator=g)
    label[0, 0, :3] = 255
    weight = torch.tensor([0.25, 0.75])[:, None, None].expand(2, 8, 8).clone()
    weight[:, :2] = 0  # ignored rows
    mic = MIC(MICSettings(weight=0.5), MethodContext(num_classes=3))
    got = mic.masked_losses({"logits": logits}, view_of(torch.zeros(2, 3, 8, 8), label, weight))
    assert set(got) == {"masked.ce"}
    # by hand: bilinear up to the labels, -log softmax at the label, times the pixel weight,
    # mean over all 2*8*8 pixels (ignore pixels count as 0), times mic.weight
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    logp = up - up.exp().sum(1, keepdim=True).log()
    total = 0.0
    for b in range(2):
        for y in range(8):
            for x in range(8):
                c = int(label[b, y, x])
                if c != 255:
                    total += -float(logp[b, c, y, x]) * float(weight[b, y, x])
    assert float(got["masked.ce"]) == pytest.approx(0.5 * total / 128, rel=1e-5)
    # with HRDA outputs the loss carries the detail term on the box, scaled alike
    ctx = MethodContext(num_classes=3, detail_loss_weight=0.1, multi_resolution=True)
    out = {"logits": logits, "logits_detail": torch.randn(2, 3, 2, 2, generator=g),
           "detail_box": torch.tensor([4, 8, 0, 4])}
    hr = MIC(MICSettings(weight=0.5), ctx).masked_losses(
        out, view_of(torch.zeros(2, 3, 8, 8), label, weight))
    up = F.interpolate(out["logits_detail"], size=(4, 4), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, label[:, 4:8, 0:4], ignore_index=255, reduction="none")
    assert float(hr["masked.ce_detail"]) == pytest.approx(
        0.5 * 0.1 * float((ce * weight[:, 4:8, 0:4]).mean()), rel=1e-5)


def test_settings_are_checked() -> None:
    for key, value in (("mask_ratio", 1.0), ("block_size", 0), ("weight", -1.0)):
        with pytest.raises(ConfigError, match=f"mic.{key}"):
            MICSettings(**{key: value})
    with pytest.raises(ConfigError, match="mic.block_size"):
        load_config(DEMO_MIC, ["mic.block_size=256"])  # larger than the 128x128 crop
    with pytest.raises(ConfigError, match="'mask'"):
        load_config(DEMO_MIC, ["mic.mask=0.5"])
    with pytest.raises(ConfigError, match="self_training.enabled"):
        load_config(DEMO_MIC, ["self_training.enabled=false"])


# ----------------------------------------------------------------------------------------------
# In the loop
# ----------------------------------------------------------------------------------------------
def tiny(*extra: str) -> list[str]:
    return ["data.crop_size=[64, 64]", "self_training.pseudo_threshold=0.01",
            "optim.warmup_iters=0", *extra]


def make_trainer(path: Path = DEMO_MIC, *extra: str) -> SelfTraining:
    cfg = load_config(path, tiny(*extra))
    torch.manual_seed(0)
    model = build_network(cfg)
    return SelfTraining(cfg, model, build_methods(cfg, model, torch.device("cpu")),
                        torch.device("cpu"))


def batches(it: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(100 + it)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g),
           "label": torch.randint(0, 4, (2, 64, 64), generator=g)}
    return src, {"image": torch.randn(2, 3, 64, 64, generator=g)}


def recording(trainer: SelfTraining) -> list[torch.Tensor]:
    """The masked pass's inputs, as the trainer builds them."""
    mic, seen = trainer.methods["mic"], []
    build = mic.masked_images

    def record(view: StepView) -> torch.Tensor:
        seen.append(build(view))
        return seen[-1]

    mic.masked_images = record
    return seen


def test_mic_adds_its_pass_last_and_resumes_its_masks_exactly() -> None:
    a = make_trainer()
    assert [p.name for p in a.passes(0)] == ["src", "mix", "mic.masked"]
    seen_a = recording(a)
    ra0 = a.step(*batches(0), 0)
    assert ra0.finite and "mic.masked.ce" in ra0.losses and ra0.losses["mic.masked.ce"] > 0
    state = copy.deepcopy(a.state_dict())
    ra = a.step(*batches(1), 1)

    b = make_trainer()
    seen_b = recording(b)
    b.load_state_dict(state)
    rb = b.step(*batches(1), 1)
    assert ra.losses == rb.losses
    assert torch.equal(seen_a[1], seen_b[0])  # the same augmentation and the same blocks
    masked = (seen_a[1] == 0).all(1)  # masked pixels are 0 in every channel
    assert 0.4 < float(masked.float().mean()) < 0.95  # about 70% of 16x16 blocks
    for (k, pa), pb in zip(a.student.state_dict().items(), b.student.state_dict().values(),
                           strict=True):
        assert torch.equal(pa, pb), k


def test_mic_with_hrda_masks_the_full_resolution_crop() -> None:
    t = make_trainer(DEMO_MIC, "hrda.enabled=true", "hrda.detail_crop=[32, 32]",
                     "hrda.attention_channels=8", "mic.block_size=16",
                     "model.output_stride=8")  # the 8-aligned detail box
    r = t.step(*batches(0), 0)
    assert r.finite and {"mic.masked.ce", "mic.masked.ce_detail", "mix.ce_detail"} <= set(r.losses)


@pytest.fixture(scope="module")
def synthetic_root() -> str:
    root = REPO / "data" / "synthetic"
    ensure_synthetic(str(root))
    return str(root)


def run_overrides(root: str) -> list[str]:
    sets = ["model.backbone='resnet18'", "model.embed_dim=32", "data.crop_size=[64, 64]",
            "data.num_workers=0", "data.rcs_min_pixels=10", "train.max_iters=1",
            "train.device='cpu'", "eval.mode='whole'", "eval.max_images=2", "eval.num_vis=1",
            "sepico.start_iter=0"]
    for dom, name in (("source", "synthetic_source"), ("target", "synthetic_target"),
                      ("val", "synthetic_target")):
        split = "val" if dom == "val" else "train"
        resize = "[96, 64]" if dom == "target" else "[]"
        sets += [f"data.{dom}.name={name!r}", f"data.{dom}.root={root!r}",
                 f"data.{dom}.resize={resize}", f"data.{dom}.split={split!r}"]
    return sets


def test_sepico_and_mic_stacked_log_both_under_their_names(synthetic_root: str,
                                                           tmp_path: Path) -> None:
    cfg = load_config(DEMO_SEPICO_MIC, run_overrides(synthetic_root))
    assert cfg.methods == ["sepico", "mic"]
    assert train(cfg, tmp_path / "run") is not None
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(x for x in lines if x["type"] == "train")
    assert {"src.ce", "mix.ce", "sepico.src.contrast", "sepico.tgt.contrast", "sepico.src.reg",
            "mic.masked.ce"} <= set(logged)
    parts = [logged[k] for k in logged if k.endswith((".ce", ".contrast", ".reg"))]
    assert logged["loss"] == pytest.approx(sum(parts), rel=1e-5)  # the total holds them all


# ----------------------------------------------------------------------------------------------
# DDP: the extra pass still gives one all-reduce per step
# ----------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        cfg = load_config(DEMO_MIC, tiny())
        device = torch.device("cpu")
        torch.manual_seed(0)
        model, ddp = wrap_student(build_network(cfg), DistInfo(rank, world, rank), device)
        trainer = SelfTraining(cfg, model, build_methods(cfg, model, device), device,
                               ddp_model=ddp)
        reduced: list[int] = []

        def count(state, bucket):  # noqa: ANN001, ANN202 (DDP checks annotations)
            reduced.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, count)
        out: dict = {"reduced": [], "losses": []}
        for it in range(2):
            reduced.clear()
            src, tgt = batches(10 * rank + it)  # each rank its own images
            result = trainer.step(src, tgt, it)
            assert result.finite
            out["reduced"].append(list(reduced))
            out["losses"].append(result.losses)
            out["passes"] = [p.name for p in trainer.passes(it)]
        out["params"] = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_the_masked_pass_all_reduces_once_per_step(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    shutil.rmtree(tmp_path, ignore_errors=True)
    for rank in ranks:
        assert rank["passes"] == ["src", "mix", "mic.masked"]
        assert all("mic.masked.ce" in losses for losses in rank["losses"])
        for step, buckets in enumerate(rank["reduced"]):
            assert buckets and sorted(buckets) == list(range(len(buckets))), \
                f"step {step}: buckets all-reduced {buckets} (each should be reduced once)"
    # the ranks saw different images, yet hold the same weights: the one all-reduce carried the
    # gradients of all three passes (a pass after it would leave rank-local gradients)
    assert ranks[0]["losses"][0]["mic.masked.ce"] != ranks[1]["losses"][0]["mic.masked.ce"]
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name
