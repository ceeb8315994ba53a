"""Distributed training on CPU (gloo, 2 processes): the DDP step is the large-batch step, class
statistics pool every rank's pixels, the teacher stays identical on every rank, and the torchrun
entry point logs, evaluates, checkpoints and resumes as one process would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from fastuda.config import Config, load_config
from fastuda.data import build_val_loader
from fastuda.data.synthetic import generate_synthetic
from fastuda.engine.checkpoint import load_checkpoint
from fastuda.engine.distributed import DistInfo, average_buffers, wrap_student
from fastuda.engine.self_training import SelfTraining
from fastuda.evaluate import evaluate
from fastuda.methods import build_methods
from fastuda.models import build_model
from fastuda.ops import reference

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.toml"
pytestmark = pytest.mark.slow  # process start-up dominates: ~2-4 min on 2 shared cores

ITERS = 3
CROP = 64
SYNTHETIC_COUNTS = {"source": {"train": 16}, "target": {"train": 16, "val": 8}}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small synthetic pair of this test module's own (a few seconds to write)."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(root, counts=SYNTHETIC_COUNTS, workers=1)
    return str(root)


def tiny_overrides(root: str) -> list[str]:
    """The demo config shrunk: ResNet-18, D = 32, 64 x 64 crops, data in-process."""
    sets = ["model.backbone='resnet18'", "model.embed_dim=32", f"data.crop_size=[{CROP}, {CROP}]",
            "data.num_workers=0", "data.rcs_min_pixels=10", "train.device='cpu'",
            "eval.mode='whole'", "eval.num_vis=1", "sepico.start_iter=0"]
    for dom, name, split in (("source", "synthetic_source", "train"),
                             ("target", "synthetic_target", "train"),
                             ("val", "synthetic_target", "val")):
        resize = "[96, 64]" if dom == "target" else "[]"
        sets += [f"data.{dom}.name={name!r}", f"data.{dom}.root={root!r}",
                 f"data.{dom}.resize={resize}", f"data.{dom}.split={split!r}"]
    return sets


# ----------------------------------------------------------------------------------------------
# The DDP step against the one-process large-batch step
# ----------------------------------------------------------------------------------------------
def equivalence_config(root: str) -> Config:
    """Settings under which one step over 2 images is one mathematical function, whether the two
    images sit on one process or on two ranks (see the docstring of the test below)."""
    return load_config(DEMO, tiny_overrides(root) + [
        "self_training.class_balanced_crop=false", "self_training.pseudo_threshold=0.01",
        "sepico.reg_weight=0.0", "self_training.downscale_min_ratio=0.01",
        "optim.warmup_iters=0",
        "model.output_stride=8",  # the label grids below are the stride-8 ones
        "optim.lr=1e-3"])


class RunningStatsBatchNorm(nn.BatchNorm2d):
    """BatchNorm that normalises with its running statistics in training mode too (they stay at
    their initial values): the affine weights still train, batch statistics play no part."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


def equivalence_batches() -> list[tuple[dict, dict]]:
    """ITERS steps of 2 source + 2 target images. Each source label holds one class on the left
    half and ignore on the right half (8-pixel aligned, so every label grid sees the same counts
    per image), and the class differs per image and step."""
    g = torch.Generator().manual_seed(1)
    steps = []
    for it in range(ITERS):
        label = torch.full((2, CROP, CROP), 255, dtype=torch.long)
        for i in range(2):
            label[i, :, :CROP // 2] = (5 * it + 3 * i + 1) % 19
        source = {"image": torch.randn(2, 3, CROP, CROP, generator=g), "label": label}
        target = {"image": torch.randn(2, 3, CROP, CROP, generator=g)}
        steps.append((source, target))
    return steps


def build_trainer(cfg: Config, info: DistInfo, running_stats_bn: bool) -> SelfTraining:
    """What fastuda.train.Run builds (same wrap_student), optionally with RunningStatsBatchNorm."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    # the tolerances below were set for fastuda's earlier decay rule (no decay on 1-D
    # parameters); the released rule (optim.no_decay = "mmseg", every BN weight decayed) moves
    # the trajectory so that the rank/one-process rounding differences exceed them at a few
    # weights (8 of 2.4M by 1.4x): the DDP equivalence under test does not depend on the rule
    model.no_decay = "1d"
    if running_stats_bn:
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = RunningStatsBatchNorm
    device = torch.device("cpu")
    model, ddp = wrap_student(model, info, device)
    methods = build_methods(cfg, model, device)
    return SelfTraining(cfg, model, methods, device, ddp_model=ddp)


def run_equivalence(cfg: Config, info: DistInfo) -> dict:
    # oneDNN picks different convolution algorithms for batch 1 and batch 2, whose gradients
    # differ here by up to ~1% of their scale; PyTorch's own CPU convolution agrees to ~1e-7
    with torch.backends.mkldnn.flags(enabled=False):
        return _run_equivalence(cfg, info)


def _run_equivalence(cfg: Config, info: DistInfo) -> dict:
    trainer = build_trainer(cfg, info, running_stats_bn=True)
    # SGD instead of AdamW: AdamW's first updates are about lr * sign(g), so gradients that are
    # zero up to rounding would move weights by +-lr depending on the summation order; SGD's
    # update is linear in the gradient, so weight differences show gradient differences
    trainer.optimizer = torch.optim.SGD(
        [{"params": g["params"], "lr": g["lr"], "initial_lr": g["initial_lr"],
          "weight_decay": g["weight_decay"]} for g in trainer.optimizer.param_groups],
        lr=cfg.optim.lr, momentum=0.9)
    take = slice(info.rank, info.rank + 1) if info.enabled else slice(0, 2)
    out: dict = {"stats": [], "initial": {k: v.clone()
                                          for k, v in trainer.student.state_dict().items()}}
    for it, (source, target) in enumerate(equivalence_batches()):
        result = trainer.step({k: v[take] for k, v in source.items()},
                              {k: v[take] for k, v in target.items()}, it)
        assert result.finite
        out.setdefault("losses", []).append(result.losses)
        out["stats"].append(tuple(t.clone() for t in trainer.methods["sepico"].stats.stats()))
        if it == 0:  # the first step's gradients: both runs start from the same weights
            out["grads"] = {n: p.grad.clone() for n, p in trainer.student.named_parameters()
                            if p.grad is not None}
    out["student"] = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    out["teacher"] = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    return out


def _reduction_and_nonfinite_check(cfg: Config, info: DistInfo) -> dict:
    """Which gradient buckets each step all-reduces (a counting comm hook), and a step in which
    only rank 1 meets a non-finite loss (a NaN target image), followed by a normal step."""
    trainer = build_trainer(cfg, info, running_stats_bn=True)
    reduced: list[int] = []

    # no annotations: DDP checks them, and this module's are strings (__future__)
    def count_reductions(state, bucket):  # noqa: ANN001, ANN202
        reduced.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    trainer.forward_student.register_comm_hook(None, count_reductions)
    take = slice(info.rank, info.rank + 1)
    out: dict = {"reduced_buckets": [], "finite": []}
    batches = equivalence_batches()
    for it, (source, target) in enumerate(batches[:2]):
        reduced.clear()
        assert trainer.step({k: v[take] for k, v in source.items()},
                            {k: v[take] for k, v in target.items()}, it).finite
        out["reduced_buckets"].append(list(reduced))
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    source, target = batches[2]
    target = {k: v[take].clone() for k, v in target.items()}
    if info.rank == 1:  # a NaN target image: NaN target contrast loss (statistics untouched)
        target["image"].fill_(float("nan"))
    out["finite"].append(trainer.step({k: v[take] for k, v in source.items()}, target, 2).finite)
    out["unchanged"] = all(torch.equal(v, trainer.student.state_dict()[k])
                           for k, v in before.items())
    source, target = batches[0]  # the ranks still run matching collectives afterwards
    out["finite"].append(trainer.step({k: v[take] for k, v in source.items()},
                                      {k: v[take] for k, v in target.items()}, 3).finite)
    return out


def _teacher_sync_check(cfg: Config, info: DistInfo, work_dir: Path) -> dict:
    """Two steps of fastuda.train.Run (real BatchNorm, real data) on this rank."""
    from fastuda.train import Run

    torch.manual_seed(cfg.train.seed)
    run = Run(cfg, work_dir, info, torch.device("cpu"))
    for _ in range(2):
        assert run.step().finite
    # this rank's own running statistics: one more forward in training mode, not averaged
    local = {k: v.clone() for k, v in run.trainer.student.state_dict().items()}
    with torch.no_grad():
        run.trainer.student.train()(next(run.source)["image"])
    own = {k: v.clone() for k, v in run.trainer.student.state_dict().items()
           if k.endswith("running_mean")}
    return {"teacher": run.trainer.teacher.state_dict(), "student": local, "own_bn": own}


def _worker(rank: int, world: int, init_file: str, out_dir: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        info = DistInfo(rank, world, rank)
        out = run_equivalence(equivalence_config(root), info)
        with torch.backends.mkldnn.flags(enabled=False):
            out["ddp_checks"] = _reduction_and_nonfinite_check(equivalence_config(root), info)
        sync_cfg = load_config(DEMO, tiny_overrides(root) + ["train.max_iters=2"])
        out["sync"] = _teacher_sync_check(sync_cfg, info, Path(out_dir) / "run")
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, synthetic_root: str) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out), synthetic_root), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    shutil.rmtree(out)  # ~540 MB of per-step states, in memory now: leave the disk to later tests
    return ranks


@pytest.fixture(scope="module")
def one_process(synthetic_root: str) -> dict:
    with torch.random.fork_rng():
        return run_equivalence(equivalence_config(synthetic_root), DistInfo())


def test_statistics_pool_all_ranks(two_ranks: list[dict], one_process: dict,
                                   synthetic_root: str) -> None:
    """Every rank ends each step with the statistics of all ranks' pixels: the pixel counts are
    exactly those of the one-process run that sees both images, the moments equal its moments
    (to fp32 rounding), the ranks agree bit for bit, and the first step's
    statistics equal the fp64 statistics of the initial teacher's embeddings of both images."""
    for step in range(ITERS):
        a, b, single = two_ranks[0]["stats"][step], two_ranks[1]["stats"][step], \
            one_process["stats"][step]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"step {step}"
        assert torch.equal(a[0], single[0]), f"pixel counts differ at step {step}"
        assert a[0].sum() == (step + 1) * 2 * (CROP // 8) * (CROP // 16)  # left-half cells
        torch.testing.assert_close(a[1], single[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[2], single[2], rtol=1e-5,
                                   atol=1e-6 * float(single[2].abs().max()))

    cfg = equivalence_config(synthetic_root)
    with torch.random.fork_rng():
        teacher = build_trainer(cfg, DistInfo(), running_stats_bn=True).teacher
    source, _ = equivalence_batches()[0]
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        emb = teacher(source["image"])["embeddings"].double()
    labels = reference.downscale_labels(source["label"], 8, num_classes=19, min_ratio=0.01)
    count, mean, m2 = reference.class_stats(emb, labels, 19)
    got = two_ranks[0]["stats"][0]
    assert torch.equal(got[0], count.double())
    torch.testing.assert_close(got[1], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], m2, rtol=1e-4, atol=1e-5)


def test_two_ranks_of_one_image_train_like_one_process_of_two(two_ranks: list[dict],
                                                               one_process: dict) -> None:
    """2 ranks x batch 1 == 1 process x batch 2 for ITERS full self-training steps (source CE +
    contrast, target contrast on pseudo-labels, ClassMix CE; three backward passes, optimiser,
    EMA): the same losses, gradients and weights.

    DDP averages the ranks' gradients, so the two runs agree when the loss of a 2-image batch is
    the mean of the per-image losses and nothing else couples the images. The settings make that
    so, without changing any loss:
    * BatchNorm normalises with running statistics (RunningStatsBatchNorm): plain BatchNorm on
      CPU uses each rank's own batch statistics (SyncBatchNorm exists only for CUDA).
    * equal valid-pixel counts per image in every mean: source labels of one class on the left
      half and ignore on the right (aligned to the 8x8 embedding cells), pseudo-label weight 1
      everywhere (threshold 0.01 < 1/19), no ignore from label downscaling (min_ratio 0.01 is
      below any majority in an 8x8 cell), whole images (no class-balanced crop). ClassMix pastes
      the one source class: the same mask however the random draws fall.
    * SePiCo's regulariser is off: it takes log-softmax of the batch's mean feature, not a mean
      of per-image terms.
    The strong augmentation draws one parameter set per call on a generator seeded alike on
    every rank, so the same jitter and blur reach each image in both runs. SGD replaces AdamW
    (whose first updates are about lr * sign(g)) so that weights differ only as much as the
    gradients do, and both runs use PyTorch's own CPU convolution (see run_equivalence)."""
    single = one_process
    for step in range(ITERS):  # the mean over ranks of each rank's losses = the batch's losses
        for key, value in single["losses"][step].items():
            mean = sum(r["losses"][step][key] for r in two_ranks) / 2
            assert mean == pytest.approx(value, rel=1e-5, abs=1e-6), f"{key} at step {step}"
    for rank in two_ranks:
        assert set(rank["grads"]) == set(single["grads"])
        for name, g in single["grads"].items():
            scale = g.abs().max().clamp_min(1e-12)
            torch.testing.assert_close(rank["grads"][name], g, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, n=name: f"gradient of {n}: {m}")
        # the weights agree to 0.1% of how far they moved (the gradients of the three passes
        # are summed per rank, then averaged over ranks: another rounding order than one
        # process's sum)
        for key, w in single["student"].items():
            moved_by = float((w - single["initial"][key]).abs().max()) if w.is_floating_point() \
                else 0.0
            torch.testing.assert_close(rank["student"][key], w, rtol=1e-5,
                                       atol=max(1e-6, 1e-3 * moved_by),
                                       msg=lambda m, k=key: f"student {k}: {m}")
    # the ranks hold bit-identical students and teachers (DDP all-reduce, then the same EMA)
    for part in ("student", "teacher"):
        for key, w in two_ranks[0][part].items():
            assert torch.equal(w, two_ranks[1][part][key]), f"{part} {key} differs across ranks"
    moved = max(float((single["student"][k] - v).abs().max())
                for k, v in single["initial"].items() if v.is_floating_point())
    assert moved > 1e-3, "the weights barely moved: the comparison would be vacuous"


def test_gradients_all_reduced_once_per_step(two_ranks: list[dict]) -> None:
    """A step runs three student passes (source, target, mixed); the first two run under DDP's
    no_sync(), so each gradient bucket is all-reduced once per step, in the last backward, with
    the gradients of all three passes (test above: they equal the one-process gradients)."""
    for rank in two_ranks:
        steps = rank["ddp_checks"]["reduced_buckets"]
        for step, buckets in enumerate(steps):
            assert buckets, f"step {step}: no gradient was all-reduced"
            assert sorted(buckets) == list(range(len(buckets))), \
                f"step {step}: buckets all-reduced {buckets} (each should be reduced once)"
        assert len(steps[0]) == len(steps[1])


def test_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(two_ranks: list[dict]) -> None:
    """Rank 1 alone meets a NaN loss: both ranks skip that step (same collectives, no hang, no
    weight change) and train the next one normally."""
    for rank in two_ranks:
        checks = rank["ddp_checks"]
        assert checks["finite"] == [False, True]
        assert checks["unchanged"]


def test_student_and_teacher_identical_on_every_rank(two_ranks: list[dict]) -> None:
    """fastuda.train.Run with real BatchNorm on CPU: each rank's running statistics follow its
    own batches (no SyncBatchNorm on CPU); Run.step averages them after every step, so student
    (evaluated by every rank, checkpointed by rank 0) and teacher (pseudo-labels, statistics)
    are identical on every rank."""
    a, b = (r["sync"] for r in two_ranks)
    assert any(not torch.equal(v, b["own_bn"][k]) for k, v in a["own_bn"].items()), \
        "the ranks' own BatchNorm statistics never differed: the check would be vacuous"
    for part in ("student", "teacher"):
        for key, w in a[part].items():
            assert torch.equal(w, b[part][key]), f"{part} {key} differs across ranks"


def test_average_buffers_without_process_group_is_a_no_op() -> None:
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    before = bn.running_mean.clone()
    average_buffers(bn)
    assert torch.equal(bn.running_mean, before)


# ----------------------------------------------------------------------------------------------
# The entry point under torchrun
# ----------------------------------------------------------------------------------------------
def _launch(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "fastuda.train", *args]
    else:
        cmd = [sys.executable, "-m", "fastuda.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _same(x: object, y: object, where: str) -> None:
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y), f"{where} differs"
    elif isinstance(x, dict):
        assert set(x) == set(y), where
        for k in x:
            _same(x[k], y[k], f"{where}.{k}")


def test_torchrun_train_evaluate_checkpoint_resume(synthetic_root: str, tmp_path: Path) -> None:
    """torchrun --standalone --nproc_per_node=2 -m fastuda.train: rank 0 alone logs and writes
    checkpoints; the evaluation over both ranks' shards equals one process evaluating the same
    images; resuming under torchrun continues exactly; resuming with one process warns."""
    sets = tiny_overrides(synthetic_root) + [
        "train.max_iters=3", "train.checkpoint_interval=1", "train.eval_interval=3",
        "train.log_interval=1", "train.deterministic=true", "sepico.start_iter=1",
        "eval.max_images=4", "train.keep_checkpoints=2"]
    args = [str(DEMO), *(x for s in sets for x in ("--set", s))]

    whole = tmp_path / "whole"
    done = _launch([*args, "--work-dir", str(whole)], nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2, 3]  # rank 0 only
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["iter"] for r in evals] == [3]
    final = load_checkpoint(whole / "checkpoints" / "latest.pt")
    assert final["iteration"] == 3 and final["world_size"] == 2
    # ~180 MB per checkpoint: keep on disk only what the resumes below start from
    for name in ("latest.pt", "iter_3.pt"):
        (whole / "checkpoints" / name).unlink()

    # evaluation: intersections and unions summed over the ranks' shards (images 0, 2 | 1, 3)
    cfg = load_config(DEMO, sets)
    model = build_model(cfg.model)
    model.load_state_dict(final["trainer"]["student"])
    record = evaluate(model, build_val_loader(cfg.data), cfg, torch.device("cpu"))
    assert record["IoU"] == evals[0]["IoU"] and record["mIoU"] == evals[0]["mIoU"]

    # resume under torchrun from iteration 2: the same final state as the uninterrupted run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.link(whole / "checkpoints" / "iter_2.pt", resumed / "checkpoints" / "latest.pt")
    done = _launch([*args, "--work-dir", str(resumed), "--resume", "auto"], nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    again = load_checkpoint(resumed / "checkpoints" / "latest.pt")
    assert again["iteration"] == 3
    for part in ("student", "teacher", "methods", "optimizer"):
        _same(final["trainer"][part], again["trainer"][part], part)
    shutil.rmtree(resumed)

    # resume the 2-rank checkpoint in one process: allowed, with a warning about the data order
    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    os.link(whole / "checkpoints" / "iter_2.pt", single / "checkpoints" / "latest.pt")
    done = _launch([*args, "--work-dir", str(single), "--resume", "auto"], nproc=1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checkpoint was written with world size 2, resuming with 1" in done.stdout + done.stderr
    assert load_checkpoint(single / "checkpoints" / "latest.pt")["iteration"] == 3
