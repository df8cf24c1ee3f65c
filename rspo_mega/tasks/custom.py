"""Tasks of one's own: ``data.task`` naming a task class outside this package.

``data.task`` takes a built-in name (:data:`rspo_mega.tasks.TASKS`), an import path
``module.path:ClassName`` or the name of an entry point of group ``rspo_mega.tasks`` that an
installed package declares (``[project.entry-points."rspo_mega.tasks"] mytask =
"my_pkg.tasks:MyTask"``). The class must subclass :class:`rspo_mega.tasks.base.Task` and implement
its abstract methods; it is built with no arguments. A module that is not on the Python path is
looked for in the working directory too, so ``data.task=my_task:MyTask`` finds ``./my_task.py``
under ``rspo-train`` as under ``python -m``. Every failure is a :class:`ConfigError` naming
``data.task``, raised when the config is validated (before any process group or model exists).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from types import ModuleType

from rspo_mega.errors import ConfigError
from rspo_mega.config.schema import TASK_ENTRY_POINTS
from rspo_mega.tasks.base import Task

__all__ = ["load_task_class"]


def _import_module(name: str, spec: str) -> ModuleType:
    """``name`` imported from the Python path, else from the working directory."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing_own = err.name is not None and name.split(".")[0] == err.name.split(".")[0]
        if not missing_own or os.getcwd() in sys.path:
            raise ConfigError(f"data.task={spec}: cannot import module '{name}': {err}") from None
    sys.path.append(os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"data.task={spec}: cannot import module '{name}' (looked on the "
                          f"Python path and in {os.getcwd()}): {err}") from None


def _from_import_path(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    module = _import_module(module_name, spec)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"data.task={spec}: module '{module_name}' ({module.__file__}) has no "
                          f"'{attr}'") from None


def _from_entry_point(spec: str) -> object:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=TASK_ENTRY_POINTS) if ep.name == spec]
    if not found:
        raise ConfigError(f"data.task={spec}: no built-in task, entry point of group "
                          f"'{TASK_ENTRY_POINTS}' or import path module.path:ClassName")
    try:
        return found[0].load()
    except ImportError as err:
        raise ConfigError(f"data.task={spec}: entry point {found[0].value} of group "
                          f"'{TASK_ENTRY_POINTS}' cannot be loaded: {err}") from None


def load_task_class(spec: str) -> type[Task]:
    """The :class:`Task` subclass ``spec`` names (``module.path:ClassName`` or an entry point)."""
    cls = _from_import_path(spec) if ":" in spec else _from_entry_point(spec)
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise ConfigError(f"data.task={spec}: {cls!r} is not a subclass of "
                          "rspo_mega.tasks.base.Task")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ConfigError(f"data.task={spec}: {cls.__name__} does not implement {missing}")
    return cls
