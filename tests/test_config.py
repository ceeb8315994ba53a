"""TOML configs load into typed dataclasses; bad keys and values are errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fastuda.config import Config, ConfigError, from_dict, load_config, method_registry, to_toml

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, 'methods = ["sepico"]\n[train]\nmax_iters = 10\n')
    cfg = load_config(p, ["train.max_iters=7", "sepico.variant=bank", "optim.lr=1e-4",
                          'data.source.root="/x y"', "data.crop_size=[64, 32]"])
    assert cfg.train.max_iters == 7 and cfg.settings("sepico").variant == "bank"
    assert cfg.optim.lr == 1e-4 and cfg.data.source.root == "/x y"
    assert cfg.data.crop_size == [64, 32]


@pytest.mark.parametrize("text, needle", [
    ("[train]\nmax_iter = 10\n", "'max_iter'"),
    ("[trian]\n", "'trian'"),
    ('[train]\nprecision = "fp8"\n', "train.precision"),
    ('[train]\nmax_iters = "ten"\n', "train.max_iters"),
    ("[train]\nmax_iters = 0\n", "train.max_iters"),
    ('[model]\nname = "deeplabv2"\nbackbone = "mit_b5"\n', "model.backbone"),
    ("[data]\ncrop_size = [512]\n", "data.crop_size"),
    ('methods = ["sepico"]\n[sepico]\ntau = -1.0\n', "sepico.tau"),
    ('[ops]\nbackend = "gpu"\n', "ops.backend"),
    ("[train]\ndeterministic = 1\n", "train.deterministic"),
    ("[train]\nkeep_checkpoints = -1\n", "train.keep_checkpoints"),
    ("[hrda]\nscale = 0.5\n", "'scale'"),
    ("[hrda]\ncontext_scale = 0.3\n", "hrda.context_scale"),
    ("[hrda]\ncontext_scale = 1.0\n", "hrda.context_scale"),
    ("[hrda]\ndetail_crop = [512]\n", "hrda.detail_crop"),
    ("[hrda]\ndetail_loss_weight = -1.0\n", "hrda.detail_loss_weight"),
    ("[hrda]\nattention_channels = 0\n", "hrda.attention_channels"),
    ("[hrda]\nslide_stride = [600, 100]\n", "hrda.slide_stride"),
    ("[hrda]\nenabled = true\ndetail_crop = [1024, 512]\n", "hrda.detail_crop"),
    ("[hrda]\nenabled = true\ndetail_crop = [100, 96]\n", "hrda.detail_crop"),
    ("[hrda]\nenabled = true\n[data]\ncrop_size = [516, 512]\n", "data.crop_size"),
    ("[hrda]\nenabled = true\nslide_stride = [258, 256]\n", "hrda.slide_stride"),
    # the detail box's corner must sit on the stride-16 grid that model.output_stride asks for
    ('[model]\nname = "deeplabv2"\nbackbone = "resnet18"\noutput_stride = 16\n'
     "[hrda]\nenabled = true\ncrop_divisible = 8\n",
     "hrda.crop_divisible"),
    ('methods = ["corda"]\n[hrda]\nenabled = true\n', "hrda.enabled"),
    ('[self_training]\nteacher_norm = "eval"\n', "self_training.teacher_norm"),
    ('[self_training]\nquality_weight = "pixel"\n', "self_training.quality_weight"),
    ('[self_training]\nsource_ce_average = "mean"\n', "self_training.source_ce_average"),
    ('[data]\nval_labels = "full"\n', "data.val_labels"),
    ("[data.source]\nkeep_ratio = 1\n", "data.source.keep_ratio"),
    # one scale draw: scale_choices with the default ratio_range [0.5, 2.0] is ambiguous
    ("[data]\nscale_choices = [0.8, 1.2]\n", "data.ratio_range"),
    ("[data]\nratio_range = [1.0, 1.0]\nscale_choices = [0.8, 0.0]\n", "data.scale_choices"),
    ('[data]\nsmall_crop = "stretch"\n', "data.small_crop"),
    ("[data.source]\ncolor_jitter = [0.5, 0.5]\n", "data.source.color_jitter"),
    ("[data.source]\ncolor_jitter = [0.5, 0.5, 0.5, 0.7]\n", "data.source.color_jitter"),
    ("[data.source]\ncolor_jitter = [-0.1, 0.5, 0.5, 0.2]\n", "data.source.color_jitter"),
    ("[data.target]\ncolor_jitter = [0.5, 0.5, 0.5, 0.2]\n", "data.target.color_jitter"),
    ("[data.val]\ncolor_jitter = [0.5, 0.5, 0.5, 0.2]\n", "data.val.color_jitter"),
])
def test_invalid_configs_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert needle in str(err.value)


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, ""), ["train.max_iters"])


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"))


def test_round_trip_through_toml() -> None:
    cfg = from_dict({"methods": ["sepico"], "sepico": {"variant": "proto"},
                     "data": {"source": {"label_map": {"7": 0, "8": 1}}}})
    again = from_dict(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_required_key_names_exist() -> None:
    cfg = Config()
    for key in ("train.max_iters", "train.eval_interval", "train.checkpoint_interval",
                "train.seed", "train.deterministic", "train.precision", "ops.backend",
                "data.loader", "data.on_error", "model.pretrained",
                "self_training.downscale_min_ratio"):
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.num_classes == cfg.data.source.num_classes


def test_extends_merges_bases_underneath(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.toml").write_text('[train]\nmax_iters = 5\nseed = 3\n[data.source]\n'
                                             'name = "gta"\nroot = "data/gta"\n')
    (tmp_path / "run.toml").write_text('extends = "base/a.toml"\n[train]\nseed = 4\n')
    cfg = load_config(tmp_path / "run.toml")
    assert (cfg.train.max_iters, cfg.train.seed) == (5, 4)
    assert (cfg.data.source.name, cfg.data.source.root) == ("gta", "data/gta")
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.toml")
    (tmp_path / "bad.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(ConfigError, match="missing.toml"):
        load_config(tmp_path / "bad.toml")


@pytest.mark.parametrize("config, name", [("demo_bipcl", "bipcl"), ("demo_cluda", "cluda"),
                                          ("demo_corda", "corda"), ("demo_mic", "mic"),
                                          ("demo_spcl", "spcl")])
def test_pseudo_label_methods_need_the_self_training_loop(config: str, name: str) -> None:
    # one check for every method that declares needs_self_training (config.py), one message
    root = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(ConfigError, match=rf"\[\.\.\., '{name}'\].*self_training.enabled = true"):
        load_config(root / f"{config}.toml", ["self_training.enabled=false"])
    needing = {n for n, m in method_registry().items() if m.needs_self_training}
    assert needing == {"bipcl", "cluda", "corda", "daynight", "mic", "spcl"}
