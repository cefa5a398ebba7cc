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
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        log.info("loading %s from the local hub cache (HF_HUB_OFFLINE is set)", what)
        return
    log.info("loading %s from the hub...; without network this retries for about 30 s: HF_HUB_OFFLINE=1 uses "
             "the local cache only, %s avoids the hub", what, offline_alternative)
