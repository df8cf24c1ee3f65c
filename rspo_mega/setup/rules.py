"""The rules a loss or a task declares, checked against a run's config with the config's own
rules (:func:`rspo_mega.config.validate_config`) before any process group or model exists.

A loss class declares whether it is RL (``is_rl``), whether it needs the reference
(``needs_reference(algorithm)``) and the ``likelihood.mask_scheme`` values it is defined on
(``mask_schemes``, with ``mask_schemes_why``); a task declares its record fields
(``default_fields``) and checks its options in its constructor.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from rspo_mega.algorithms.registry import LOSSES, is_rl
from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig, TrainConfig
from rspo_mega.config.validate import LAUNCHED, Layout, validate_config
from rspo_mega.errors import ConfigError
from rspo_mega.tasks import task_factory
from rspo_mega.tasks.countdown import CountdownTask


def _sole_taker(name: str, scheme: str) -> Optional[str]:
    """The loss, ``name``'s or the one taking ``scheme``, whose mask schemes no other loss
    takes (AGRPO's trajectory), or None."""
    for other, loss in LOSSES.items():
        if other != name and scheme not in loss.mask_schemes:
            continue
        if not any(set(loss.mask_schemes) & set(rival.mask_schemes)
                   for rival_name, rival in LOSSES.items() if rival_name != other):
            return other
    return None


def check_mask_scheme(alg: AlgorithmConfig, lik: LikelihoodConfig) -> None:
    """``likelihood.mask_scheme`` is one the loss of ``algorithm.name`` declares."""
    loss, scheme = LOSSES[alg.name], lik.mask_scheme
    if scheme in loss.mask_schemes:
        return
    sole = _sole_taker(alg.name, scheme)
    if sole is not None:
        taken = LOSSES[sole]
        raise ConfigError(f"algorithm.name={alg.name!r} with likelihood.mask_scheme={scheme!r}: "
                          f"algorithm.name={sole} takes likelihood.mask_scheme="
                          f"{'/'.join(taken.mask_schemes)}, and only it does "
                          f"({taken.mask_schemes_why})")
    why = f" ({loss.mask_schemes_why})" if loss.mask_schemes_why else ""
    raise ConfigError(f"likelihood.mask_scheme={scheme!r} does not suit algorithm.name="
                      f"{alg.name!r}{why}: use one of {list(loss.mask_schemes)}")


def check_run_kind(cfg: TrainConfig) -> None:
    """What only an RL run has: completions of a prompt to share masks among, and samples."""
    if is_rl(cfg.algorithm):
        return
    name, lik = cfg.algorithm.name, cfg.likelihood
    if lik.mask_sharing != "completion":
        raise ConfigError(f"likelihood.mask_sharing={lik.mask_sharing!r} shares masks among the "
                          f"completions of a prompt; an SFT run (algorithm.name={name}) has one "
                          "target per prompt: set likelihood.mask_sharing=completion")
    if cfg.logging.sample_interval:
        raise ConfigError("logging.sample_interval logs RL completions with their rewards; an SFT "
                          f"run (algorithm.name={name}) generates none: set it to 0")


def check_data(cfg: TrainConfig) -> None:
    """The generated-Countdown section (checked by the task's own constructor, whatever the
    task, so a bad section in a shared YAML is found at once) and ``data.fields`` against the
    fields the task declares."""
    try:
        CountdownTask(**dataclasses.asdict(cfg.data.countdown))
    except ValueError as err:
        raise ConfigError(f"data.countdown: {err}") from None
    known = task_factory(cfg.data.task).default_fields  # a task of one's own is imported here
    unknown = sorted(set(cfg.data.fields) - set(known))
    if unknown:
        raise ConfigError(f"data.fields: unknown field(s) {unknown} for task {cfg.data.task!r}; "
                          f"its fields are {sorted(known)}")


def validate_run(cfg: TrainConfig, world_size: Optional[int] = None,
                 world_source: str = LAUNCHED) -> Layout:
    """Every rule of a run: the mask scheme the loss declares (first: the config's rules of an
    estimator assume its loss), the config's (:func:`validate_config`, whose arguments these
    are), then the rest of the loss's and the task's declarations; returns the layout."""
    check_mask_scheme(cfg.algorithm, cfg.likelihood)
    layout = validate_config(cfg, world_size, world_source)
    check_run_kind(cfg)
    check_data(cfg)
    return layout
