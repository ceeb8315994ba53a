"""What a resume may change: the config of the run against the config its checkpoint recorded.

Keys that define the run (the model, the classes, the methods and their settings, the self-training
recipe, the seed) are never changed by a resume: continuing a resnet18 run as resnet50, or a
seed-0 run with seed 7, would make a record no run ever produced. Every other difference
(max_iters, intervals, evaluation, workers, roots, ...) needs ``--allow-config-change``, so that
none happens by mistake.
"""

from __future__ import annotations

from typing import Any

import tomllib

from ..config import Config, ConfigError, method_registry, to_toml

# dotted-key prefixes that define the run (and every method's own [name] section, see
# run_defining())
RUN_DEFINING = ("model.", "methods", "self_training.", "hrda.", "train.seed",
                "data.source.name", "data.target.name", "data.source.num_classes",
                "data.target.num_classes", "data.val.num_classes")


def run_defining() -> tuple[str, ...]:
    return RUN_DEFINING + tuple(f"{name}." for name in method_registry())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved_toml: str, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value in the checkpoint, value now)} for every key that differs."""
    old = _flatten(tomllib.loads(saved_toml))
    new = _flatten(tomllib.loads(to_toml(cfg)))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def check_resume_config(saved_toml: str, cfg: Config, source: str,
                        allow_config_change: bool) -> list[str]:
    """Raise ConfigError naming the keys a resume from ``source`` may not change; returns the
    allowed changes (as "key: old -> new") to report."""
    changes = config_changes(saved_toml, cfg)

    def fmt(keys: list[str]) -> str:
        return ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in keys)

    fixed = [k for k in changes if k.startswith(run_defining())]
    if fixed:
        raise ConfigError(f"cannot resume {source} with another run's settings: {fmt(fixed)}; "
                          "these keys define the run: start it in another --work-dir")
    other = list(changes)
    if other and not allow_config_change:
        raise ConfigError(f"the config differs from the one {source} was written with: "
                          f"{fmt(other)}; pass --allow-config-change to resume with these changes")
    return [f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in other]
