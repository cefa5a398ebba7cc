"""What zobench says before it reaches for the model/dataset hub.

Without network, huggingface_hub retries each request with backoff (5 retries, about 25-30 s in all; the
clients offer no setting to shorten that) before the clear "could not load" line. So the first thing a run
says is what it is fetching and how to avoid the wait.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def announce(what: str, offline_alternative: str) -> None:
    """One line before a hub call: what, and how to do without (unless the hub is already switched off)."""
    _hub_warnings_once()
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        log.info("loading %s from the local hub cache (HF_HUB_OFFLINE is set)", what)
        return
    log.info("loading %s from the hub...; without network this retries for about 30 s: HF_HUB_OFFLINE=1 uses "
             "the local cache only, %s avoids the hub", what, offline_alternative)


def _hub_warnings_once() -> None:
    """huggingface_hub gives its logger a console handler of its own at import, and lets records propagate to
    the root logger, whose console handler Hydra set up: each retry warning was printed twice. Where the root
    logger has handlers (a zobench job), the hub's own console handler goes: its lines come once, through the
    job's console (with its [job N] tag in a sweep) and into zobench.log."""
    hub_logger = logging.getLogger("huggingface_hub")
    if not logging.getLogger().handlers or not hub_logger.propagate:
        return
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)
