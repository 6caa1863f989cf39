"""Credentials never reach the store: the one redaction rule for every config that is stored or shown.

    redact({"store": {"url": "postgresql://me:pw@db/treeplay"}, "env": {"kwargs": {"api_key": "sk-1"}}})
    # {"store": {"url": "postgresql://me@db/treeplay"}, "env": {"kwargs": {"api_key": "<redacted>"}}}

The rule, applied to nested dicts and lists:

- A mapping key that names a credential (``is_secret_key``: ``password``, ``passwd``, ``secret``,
  ``token``, ``api_key``, ``access_key``, ``private_key``, ``credentials``, ``authorization``,
  ``cookie``... in any case, as a word of a snake_case, kebab-case or camelCase key) keeps its key
  but its value becomes ``REDACTED``, whatever the value was. An empty value (None or "") is left
  alone: there is nothing to hide and nothing to ask for on resume. Tokenizer settings that merely
  contain the word (``pad_token``, ``eos_token_id``, ``max_tokens``) are not credentials.
- Every string that is a URL (``scheme://...``) loses its password (``user:pw@host`` becomes
  ``user@host``) and every query parameter whose name names a credential (``?password=``,
  ``?sslpassword=``, ``?api_key=``). Database URLs are read the way SQLAlchemy reads them (the
  password runs up to the ``@``, so an unescaped ``/`` in it is still found); web URLs (http, ws,
  ftp) the way RFC 3986 does.

``store.queries.start_run`` applies it before a run's config is written, the inspector before a
config is shown, and migration ``0002_redact_secrets`` to rows written before the rule existed. A
resumed run therefore gets its store URL from the command line or the environment and any redacted
value from the user again (``treeplay resume RUN KEY=VALUE``), never from the store.

This module imports nothing from the project, so migrations can use it too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

REDACTED = "<redacted>"

# Words that make a key a credential wherever they appear as a word of it.
_SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "apikey", "credential",
    "credentials", "authorization", "cookie", "bearer", "privatekey", "sessionkey",
})
# ...and as a substring of a single word (``sslpassword``, ``db_passwd``, ``clientsecret``).
_SECRET_PARTS = ("password", "passwd", "secret")
# Two words that together name a key (``openai_api_key``, ``aws_access_key_id``).
_SECRET_PAIRS = frozenset({
    ("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("session", "key"),
    ("signing", "key"), ("encryption", "key"), ("auth", "key"), ("auth", "token"),
})
# "token" next to these words is a tokenizer or generation setting, not a credential.
_TOKEN_BEFORE = frozenset({
    "pad", "eos", "bos", "unk", "sep", "cls", "mask", "stop", "special", "start", "end", "image",
    "max", "min", "num", "new", "first", "last", "per", "decoder", "vocab", "extra",
})
_TOKEN_AFTER = frozenset({"id", "ids", "type", "types", "count", "length", "len", "limit", "budget", "index"})

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Schemes parsed as RFC 3986 says; anything else is treated as a database URL (SQLAlchemy's reading).
_WEB_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp", "ftps"})


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(key)]


def is_secret_key(key: str) -> bool:
    """Whether a mapping key (or URL query parameter name) names a credential."""
    words = _words(str(key))
    if any(part in w for w in words for part in _SECRET_PARTS):
        return True
    for i, w in enumerate(words):
        before = words[i - 1] if i else ""
        after = words[i + 1] if i + 1 < len(words) else ""
        if w == "token":
            if before not in _TOKEN_BEFORE and after not in _TOKEN_AFTER:
                return True
        elif w in _SECRET_WORDS:
            return True
        if (before, w) in _SECRET_PAIRS:
            return True
    return False


def _strip_query(query: str) -> str:
    """A URL query without the parameters that name credentials."""
    kept = [p for p in re.split(r"[&;]", query) if p and not is_secret_key(unquote(p.split("=", 1)[0]))]
    return "&".join(kept)


def redact_url(text: str) -> str:
    """``text`` without a URL password or credential query parameters; non-URLs come back unchanged."""
    m = _SCHEME.match(text)
    if m is None:
        return text
    head, rest = text[: m.end()], text[m.end() :]
    if m.group(1).lower() in _WEB_SCHEMES:
        authority = re.match(r"[^/?#]*", rest).group()  # type: ignore[union-attr]
        if "@" in authority:
            userinfo, host = authority.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            rest = (f"{user}@" if user else "") + host + rest[len(authority) :]
    else:
        # SQLAlchemy's URL grammar: user is [^:/]*, the password runs to the first "@".
        cred = re.match(r"([^:/@]*):([^@]*)@", rest)
        if cred is not None:
            user = cred.group(1)
            rest = (f"{user}@" if user else "") + rest[cred.end() :]
    before, sep, after = rest.partition("?")
    if sep:
        query, hash_, fragment = after.partition("#")
        query = _strip_query(query)
        rest = before + (f"?{query}" if query else "") + hash_ + fragment
    return head + rest


def redact(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, strings, scalars) with every credential removed (module doc)."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def redacted_keys(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths (``env.kwargs.api_key``) of every value ``redact`` replaced by ``REDACTED``."""
    found: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            path = f"{prefix}{k}"
            if v == REDACTED:
                found.append(path)
            else:
                found += redacted_keys(v, path + ".")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += redacted_keys(v, f"{prefix}{i}.")
    return found
