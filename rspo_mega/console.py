"""The console of the command-line entry points (``rspo-train``, ``rspo-eval``, the tools).

* :func:`hide_library_warnings` (called before megatron-core is imported) turns megatron-core's
  "Transformer Engine / Apex not installed" and deprecation warnings (and, without CUDA, its
  CUDA settings advice) into DEBUG log records;
* :func:`setup_logging` applies ``logging.level``: at the default (INFO) megatron-core's own INFO
  records (the parameter list of every DDP bucket, the ``OptimizerConfig`` repr, the scheduler)
  are hidden; ``logging.level=DEBUG`` shows them and the held warnings;
* :func:`run_entry_point` prints a :class:`~rspo_mega.errors.UserError` as one line
  ``<prog>: <kind> error: <message>`` on one rank (global rank 0 when it has the error too) and
  returns exit code 2; ``--debug`` adds the traceback on every rank. A
  :class:`~rspo_mega.errors.PeerTimeoutError` (ranks that did not reach a phase of the run) is
  one line on the lowest rank that arrived, exit code 1; Ctrl-C outside the training loop (which
  saves first, :mod:`rspo_mega.training.signals`) one line ``<prog>: interrupted``, exit code
  130. Other exceptions propagate.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from typing import Callable

from rspo_mega.errors import PEER_TIMEOUT_EXIT_CODE, PeerTimeoutError, UserError
from rspo_mega.parallel.ranks import launch_rank

USER_ERROR_EXIT_CODE = 2
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C
PEER_GRACE_S = 30.0  # a rank other than 0 waits this long before reporting (see report_user_error)
LIBRARY_LOGGERS = ("megatron",)  # their INFO records are hidden unless logging.level=DEBUG
PLOTTING_LOGGERS = ("matplotlib", "PIL")  # from WARNING up at any level (font-search chatter)
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"
_LIBRARY_DIRS = (f"{os.sep}megatron{os.sep}",)
_NOISE = ("not installed", "deprecated")  # library warnings no run config can act on
_CUDA_ONLY = "CUDA_DEVICE_MAX_CONNECTIONS"  # megatron's TP advice, noise where there is no GPU

log = logging.getLogger(__name__)
_held: list[str] = []  # library warnings seen before setup_logging, replayed at DEBUG
_configured = False


def _is_library_noise(message: Warning | str, category: type, filename: str) -> bool:
    """A megatron-core warning about its optional dependencies or its own API churn, or (on a
    machine without CUDA) about CUDA settings."""
    if not any(d in filename for d in _LIBRARY_DIRS):
        return False
    if _CUDA_ONLY in str(message) and "torch" in sys.modules:
        return not sys.modules["torch"].cuda.is_available()
    return issubclass(category, (DeprecationWarning, FutureWarning)) or \
        any(word in str(message) for word in _NOISE)


def hide_library_warnings() -> None:
    """Route library noise (see module doc) to DEBUG logging; other warnings print as usual."""
    show = warnings.showwarning
    if getattr(show, "rspo_mega_hook", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not _is_library_noise(message, category, filename):
            return show(message, category, filename, lineno, file, line)
        text = f"{filename}:{lineno}: {category.__name__}: {message}"
        if _configured:
            log.debug("%s", text)
        else:
            _held.append(text)

    showwarning.rspo_mega_hook = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def setup_logging(level: str = "INFO") -> None:
    """Log ``level`` and above to stderr; megatron-core's records from WARNING up unless
    ``level`` is DEBUG, matplotlib's and PIL's from WARNING up. Replays the held library
    warnings at DEBUG."""
    global _configured
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric, format=LOG_FORMAT)
    library_level = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    for name in PLOTTING_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    _configured = True
    for text in _held:
        log.debug("%s", text)
    _held.clear()


def reporting_rank() -> bool:
    """Whether this process prints user errors: global rank 0 (``RANK``), or a lone process."""
    return launch_rank() == 0


def _tear_down_process_group() -> None:
    """Destroy the process groups a failed run set up (nothing when none exists)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from rspo_mega.parallel import destroy_parallel

        destroy_parallel()


def report_user_error(prog: str, exc: UserError, debug: bool = False) -> int:
    """Print ``exc`` as one line and return the exit code of a user error (``debug``: with the
    traceback, on every rank).

    Rank 0 prints at once. Another rank waits :data:`PEER_GRACE_S` first: when rank 0 hit the
    same error it has printed it and exited, and the launcher (torchrun) ends this process
    meanwhile; a rank still alive after the wait had an error of its own and prints it, naming
    its rank."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    line = f"{prog}: {exc.kind} error: {exc.message()}"
    if not reporting_rank():
        time.sleep(PEER_GRACE_S)
        line = f"{prog}: {exc.kind} error (rank {os.environ['RANK']}): {exc.message()}"
    print(line, file=sys.stderr, flush=True)
    return USER_ERROR_EXIT_CODE


def report_peer_timeout(prog: str, exc: PeerTimeoutError, debug: bool = False) -> int:
    """Print ``exc`` as one line on the rank it names (every rank with ``debug``, traceback
    included); the exit code of a peer timeout."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if debug or int(os.environ.get("RANK", "0")) == exc.reporting_rank:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
    return PEER_TIMEOUT_EXIT_CODE


def run_entry_point(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """``body()``'s exit code, or 2 after printing a :class:`UserError` it raised, or 1 after
    printing a :class:`PeerTimeoutError` (then the process groups it set up are destroyed)."""
    try:
        return body()
    except UserError as exc:
        code = report_user_error(prog, exc, debug)
    except PeerTimeoutError as exc:
        code = report_peer_timeout(prog, exc, debug)
    except KeyboardInterrupt:  # Ctrl-C where no handler of its own saves first
        if debug:
            traceback.print_exc()
        if reporting_rank():
            print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        code = INTERRUPT_EXIT_CODE
    _tear_down_process_group()
    return code


def add_debug_flag(parser) -> None:
    """``--debug``: print the traceback of a user error (config, data file, checkpoint, HF
    directory) besides its one line."""
    parser.add_argument("--debug", action="store_true",
                        help="also print the traceback of a config, data, checkpoint or HF "
                             "directory error")

