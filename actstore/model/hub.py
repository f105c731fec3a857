"""Whether a Hugging Face hub model can load here, decided in a few seconds without torch.

With no network, transformers retries the hub for most of a minute before it gives up. A hub
name is therefore checked first: when the hub is offline (`HF_HUB_OFFLINE=1`) or its endpoint
cannot be reached within a few seconds, the model must already be in the Hugging Face cache (the
process then loads it offline), otherwise one line says so and how to use a local directory.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from actstore.core.errors import ActstoreError

PROBE_S = 3.0
TRUE = ("1", "true", "yes", "on")


def offline_by_setting() -> bool:
    return any(
        os.environ.get(v, "").lower() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def reachable(url: str, timeout: float = PROBE_S) -> bool:
    """True when a TCP connection to the endpoint opens within `timeout` (DNS included)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # name resolution ignores timeouts
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home) / "hub"


def cached(spec: str) -> bool:
    """True when the cache holds a model repository named `spec` (with or without its owner)."""
    root = cache_dir()
    if (root / f"models--{spec.replace('/', '--')}").is_dir():
        return True
    return "/" not in spec and any(root.glob(f"models--*--{spec}"))


def go_offline() -> None:
    """Make this process load from the cache only, without retrying an unreachable hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the variable at import time
        constants.HF_HUB_OFFLINE = True


def check_reachable(spec: str) -> None:
    """Refuse a hub model that can neither be downloaded now nor loaded from the cache."""
    if offline_by_setting():
        why = "the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1)"
    elif reachable(endpoint()):
        return
    else:
        why = f"the Hugging Face hub ({endpoint()}) could not be reached"
        if cached(spec):
            go_offline()
            return
    if cached(spec):
        return
    raise ActstoreError(
        f"model {spec!r} is not built-in or a directory, {why}, and the Hugging Face cache "
        f"({cache_dir()}) does not hold it; download it once where the hub is reachable, or "
        "give --model /path/to/model-dir (a directory as save_pretrained writes it)"
    )
