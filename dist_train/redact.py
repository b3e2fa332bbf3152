"""Secrets never reach a file or wandb: values of secret-named environment variables are masked.

Reading the environment here is the point: the values to hide are whatever credentials the job was
started with. Used by the saved config, checkpoints, metrics.jsonl and wandb.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from typing import Any

SECRET_NAME_PATTERNS = ("*_KEY", "*_TOKEN", "*_SECRET", "*PASSWORD*")
"""Environment variables whose values must never reach a file or wandb."""
_MIN_SECRET_LENGTH = 4
"""Shorter values are not credentials; masking them would mangle unrelated text such as paths."""


def _is_secret_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name.upper(), pattern) for pattern in SECRET_NAME_PATTERNS)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-named variables in `environ` (default os.environ), longest first."""
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items()
              if _is_secret_name(name) and len(value) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def scrub_secrets(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of `obj` with every secret value masked as '***' inside strings (dict keys too).

    Values under a secret-looking key (`api_key`, `hf_token`, ...) are masked whatever they hold.
    `secrets` defaults to the secret-named variables of the current environment.
    """
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, "***")
        return obj
    if isinstance(obj, dict):
        return {scrub_secrets(key, secrets): "***" if isinstance(key, str) and _is_secret_name(key) and value
                else scrub_secrets(value, secrets) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_secrets(item, secrets) for item in obj)
    return obj
