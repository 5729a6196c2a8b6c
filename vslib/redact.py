"""Secrets never reach the disk: one redaction used by every writer of configs, records, pages and logs.

The secrets of a config are ``index.elasticsearch.password`` and ``api_key``, a
``ca_certs`` given inline as PEM text, and the userinfo of a host URL
(``http://user:pw@host``). Each becomes a marker that starts with :data:`MARKER` and says
where the real value comes from::

    password: REDACTED (set VS_ES_PASSWORD)
    hosts: ['http://REDACTED@es.example:9200']

A config read back with markers in it (a run's ``config.yaml``) treats them as unset,
so the ``VS_ES_*`` environment variables supply the real values on a rerun
(:func:`unredact_config`, called by :func:`vslib.config.parse_config`).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import threading
from typing import Any, Iterable, Mapping, Optional

log = logging.getLogger(__name__)
_state = threading.local()

#: the start of every marker: a value starting with it is never sent anywhere
MARKER = "REDACTED"
#: config key -> the environment variable that supplies it
SECRET_KEYS = {"password": "VS_ES_PASSWORD", "api_key": "VS_ES_API_KEY", "ca_certs": "VS_ES_CA_CERTS"}
_BEARER = re.compile(r"(?i)\b(bearer|apikey|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@")


def marker(key: str) -> str:
    """The marker that replaces the secret ``key`` (``password`` -> ``REDACTED (set VS_ES_PASSWORD)``)."""
    env = SECRET_KEYS.get(key)
    return f"{MARKER} (set {env})" if env else MARKER


def is_marker(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MARKER)


def redact_url(url: Any) -> Any:
    """``url`` without its userinfo (``http://REDACTED@host:9200``); never raises, whatever the URL holds."""
    if not isinstance(url, str):
        return url
    return _USERINFO.sub(lambda m: m.group("scheme") + (f"{MARKER}@" if m.group("userinfo") else ""), url)


def strip_userinfo(url: Any) -> Any:
    """``url`` with its userinfo removed (``https://host:9200``), for messages; never raises."""
    if not isinstance(url, str):
        return url
    return _USERINFO.sub(lambda m: m.group("scheme"), url)


def url_secrets(url: Any) -> list[str]:
    """The password (and the whole userinfo) of a URL, so they can be scrubbed from text."""
    out = []
    if isinstance(url, str):
        for m in _USERINFO.finditer(url):
            info = m.group("userinfo")
            if info and not info.startswith(MARKER):
                out.append(info)
                if ":" in info:
                    out.append(info.split(":", 1)[1])
    return [s for s in out if len(s) >= 3]


def _is_pem(value: Any) -> bool:
    return isinstance(value, str) and "-----BEGIN" in value


def redact_es(es: dict) -> dict:
    """A copy of an ``index.elasticsearch`` mapping with its secrets replaced by markers."""
    es = dict(es)
    for key in ("password", "api_key"):
        if es.get(key) and not is_marker(es[key]):
            es[key] = marker(key)
    if _is_pem(es.get("ca_certs")):
        es["ca_certs"] = marker("ca_certs")
    if "hosts" in es:
        hosts = es["hosts"]
        es["hosts"] = [redact_url(h) for h in hosts] if isinstance(hosts, (list, tuple)) else redact_url(hosts)
    return es


def redact_config(data: Any) -> Any:
    """A deep copy of a config mapping (parsed YAML or ``Config.to_dict()``) with every secret replaced."""
    if not isinstance(data, dict):
        return data
    out = copy.deepcopy(data)
    index = out.get("index")
    if isinstance(index, dict) and isinstance(index.get("elasticsearch"), dict):
        index["elasticsearch"] = redact_es(index["elasticsearch"])
    return out


def unredact_config(data: Any, *, env: Optional[Mapping[str, str]] = None, source: str = "<dict>") -> Any:
    """Markers in a config mapping become unset (None), URL markers are dropped from hosts, so the
    environment variables supply the real values; a mapping without markers comes back unchanged.

    A marker is never sent to a server as the secret. When the config uses the Elasticsearch backend and
    ``env`` (default: the process environment) does not supply a redacted secret, a warning names the
    variable to set (the connection would otherwise be refused with a 401)."""
    if not isinstance(data, dict):
        return data
    index = data.get("index")
    es = index.get("elasticsearch") if isinstance(index, dict) else None
    if not isinstance(es, dict):
        return data
    data = copy.deepcopy(data)
    es = data["index"]["elasticsearch"]
    unset = []
    for key in SECRET_KEYS:
        if is_marker(es.get(key)):
            es[key] = None
            unset.append((f"index.elasticsearch.{key}", SECRET_KEYS[key]))
    hosts = es.get("hosts")
    if isinstance(hosts, (list, tuple)):
        es["hosts"] = [h.replace(f"://{MARKER}@", "://") if isinstance(h, str) else h for h in hosts]
    elif isinstance(hosts, str):
        es["hosts"] = hosts.replace(f"://{MARKER}@", "://")
    if es.get("hosts") != hosts:
        unset.append(("the credentials in index.elasticsearch.hosts", "VS_ES_URL"))
    env = os.environ if env is None else env
    if unset and data["index"].get("backend") == "elasticsearch" and not getattr(_state, "quiet", False):
        for what, var in unset:
            if not env.get(var):
                log.warning("%s: %s was redacted when the file was written; set %s to connect with it",
                            source, what, var)
    return data


@contextlib.contextmanager
def secrets_supplied():
    """Within it, :func:`unredact_config` does not warn about redacted secrets (the caller supplies them,
    as an experiment does from its base config, in memory)."""
    before = getattr(_state, "quiet", False)
    _state.quiet = True
    try:
        yield
    finally:
        _state.quiet = before


def secret_env(cfg) -> dict:
    """``{VS_ES_*: value}`` for the secrets ``cfg`` holds, so a child process (a notebook kernel) that reads a
    redacted copy of the config gets them from its environment, never from a file."""
    es = cfg.index.elasticsearch
    out = {}
    if es.password and not is_marker(es.password):
        out["VS_ES_PASSWORD"] = es.password
    if es.api_key and not is_marker(es.api_key):
        out["VS_ES_API_KEY"] = es.api_key
    if es.ca_certs and not is_marker(es.ca_certs):
        out["VS_ES_CA_CERTS"] = es.ca_certs
    if any(url_secrets(h) for h in es.hosts or []):
        out["VS_ES_URL"] = ",".join(es.hosts)
    return out


def secrets_of(cfg) -> list[str]:
    """Every secret value a :class:`~vslib.config.Config` holds (from the file or the environment)."""
    es = cfg.index.elasticsearch
    found = [s for s in (es.api_key, es.password) if s and not is_marker(s)]
    if _is_pem(es.ca_certs):
        found.append(es.ca_certs)
    for h in es.hosts or []:
        found += url_secrets(h)
    return sorted(set(found), key=len, reverse=True)  # longest first: a password inside a userinfo goes with it


def redact_text(text: str, secrets: Iterable[str] = (), cfg=None) -> str:
    """``text`` with each of ``secrets`` (and ``cfg``'s), URL userinfo and bearer/API-key tokens replaced."""
    values = list(secrets) + (secrets_of(cfg) if cfg is not None else [])
    for s in sorted({v for v in values if v}, key=len, reverse=True):
        text = text.replace(s, MARKER)
    text = _USERINFO.sub(lambda m: m.group("scheme") + (f"{MARKER}@" if m.group("userinfo") else ""), text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {MARKER}", text)


def redact_obj(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like object with :func:`redact_text` applied to every string in it."""
    secrets = list(secrets)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {k: redact_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, secrets) for v in obj]
    return obj


__all__ = ["MARKER", "SECRET_KEYS", "is_marker", "marker", "redact_config", "redact_es", "redact_obj",
           "redact_text", "redact_url", "secret_env", "secrets_of", "secrets_supplied", "strip_userinfo",
           "unredact_config", "url_secrets"]
