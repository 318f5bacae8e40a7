"""Keep secrets out of traces, errors and outputs.

Two tools: :func:`redact_headers` masks headers by name (``Authorization``, anything named like a
token, key, secret, cookie or password), and :func:`redact` masks known secret values wherever
they appear in nested data (a token echoed back in a response body, a key in a URL).

A secret is searched in every encoding it commonly travels in (:func:`encodings`): as is,
percent-encoded (``quote`` with and without ``/`` safe, ``quote_plus``, and twice-encoded, hex
digits in either case), JSON- and HTML-escaped, base64 (standard and URL-safe alphabets, with or
without padding, and at any of the three byte alignments inside a longer base64 text, the way
secret scanners find a key inside ``base64("user:" + key)``) and hex (either case).
"""

from __future__ import annotations

import base64
import functools
import html
import json
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

from django.conf import settings

#: What a redacted value is replaced with.
REDACTED = "***"

#: Secrets shorter than this are not searched for (too likely to match innocent text).
MIN_SECRET_LENGTH = 4

_SENSITIVE_HEADER = re.compile(r"auth|token|key|secret|cookie|password|passwd|session|signature|credential", re.I)
#: Named like a key but not a secret: an idempotency key identifies a request and helps debugging.
_NOT_SENSITIVE = frozenset({"x-idempotency-key", "idempotency-key"})


def is_sensitive_header(name: str) -> bool:
    """True when a header's value must not be shown (see the module docstring for the rule)."""
    lowered = name.strip().lower()
    return lowered not in _NOT_SENSITIVE and bool(_SENSITIVE_HEADER.search(lowered))


def redact_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` whose sensitive values are replaced by ``"***"``.

    Sensitive: ``Authorization``, ``Proxy-Authorization``, ``Cookie``/``Set-Cookie`` and any
    name containing auth, token, key, secret, password, session, signature or credential, except
    ``X-Idempotency-Key``. Non-sensitive values are also passed through :func:`redact` with the
    known secrets, for a token smuggled into another header.
    """
    secrets = known_secrets()
    return {
        str(name): REDACTED if is_sensitive_header(str(name)) else redact(value, secrets)
        for name, value in (headers or {}).items()
    }


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """Return ``value`` with every occurrence of each secret, in any of its :func:`encodings`,
    replaced by ``"***"``.

    Walks dicts (keys and values), lists and tuples (returned as lists); other scalars are
    returned unchanged. Secrets shorter than 4 characters are ignored. Longer forms are
    replaced first so a secret containing another is masked whole.
    """
    needles = sorted(
        {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH},
        key=len,
        reverse=True,
    )
    if not needles:
        return value
    return _redact(value, _pattern(tuple(needles)))


#: Secrets shorter than this are not searched for in base64 (a short needle cut from the middle of
#: an encoding matches innocent base64 text too often).
MIN_BASE64_SECRET_LENGTH = 8

_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")


def _base64_needles(raw: bytes) -> set[str]:
    """The base64 text that encodes ``raw`` whatever its byte offset (0, 1, 2) in the encoded data.

    At offset k the characters wholly made of the secret's bits run from ``ceil(8k/6)`` to
    ``floor(8(k+n)/6)``; the characters mixing in neighbouring bytes (and any padding) are left
    out, so the needle matches with or without padding and inside a longer encoding.
    """
    needles = set()
    for offset in range(3):
        data = b"\0" * offset + raw
        start, end = -(-8 * offset // 6), 8 * len(data) // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            needle = encode(data).decode()[start:end]
            if len(needle) >= MIN_SECRET_LENGTH:
                needles.add(needle)
    return needles


def encodings(secret: str) -> set[str]:
    """The forms of ``secret`` to mask (see the module docstring); all are at least 4 characters.

    Forms whose hex digits may come in either case (percent-encoding, hex) are returned as
    written by Python; :func:`redact` matches their hex digits in either case.
    """
    raw = secret.encode("utf-8", "surrogatepass")
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        quote(quote(secret, safe=""), safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        html.escape(secret),
        raw.hex(),
    }
    if len(secret) >= MIN_BASE64_SECRET_LENGTH:
        forms |= _base64_needles(raw)
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


def _atoms(form: str) -> tuple[str, ...]:
    """``form`` as regex atoms, one per character; hex digits of percent-escapes (and of a whole
    hex form) match either case (``%2f`` and ``%2F``, mixed too)."""

    def hexdigit(char: str) -> str:
        return f"[{char.lower()}{char.upper()}]" if char.isalpha() else char

    if re.fullmatch(r"[0-9a-fA-F]+", form) and len(form) % 2 == 0:
        return tuple(hexdigit(char) for char in form)
    atoms: list[str] = []
    pos = 0
    while pos < len(form):
        if _PERCENT.match(form, pos):
            atoms += ["%", hexdigit(form[pos + 1]), hexdigit(form[pos + 2])]
            pos += 3
        else:
            atoms.append(re.escape(form[pos]))
            pos += 1
    return tuple(atoms)


def _trie_regex(words: Iterable[tuple[str, ...]]) -> str:
    """One regex matching any of ``words`` (sequences of regex atoms), longest first, factored by
    common prefix.

    A plain alternation of thousands of needles makes ``re`` try each at every position (seconds
    per megabyte); a prefix tree branches on one character at a time.
    """
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for atom in word:
            node = node.setdefault(atom, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        ends = "" in node
        branches = [atom + build(child) for atom, child in sorted(node.items()) if atom]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends:  # a needle ends here and a longer one goes on: the greedy ? tries the longer first
            return f"(?:{body})?"
        return body

    return build(trie)


@functools.lru_cache(maxsize=32)
def _pattern(needles: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled prefix-tree regex per set of secrets, every encoding of each, longest match
    first (traces are redacted on a hot path)."""
    words = {_atoms(form) for needle in needles for form in encodings(needle)}
    return re.compile(_trie_regex(words) if words else "(?!)")


def redact_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every encoding of each secret (default: :func:`known_secrets`) masked."""
    result = redact(text, known_secrets() if secrets is None else secrets)
    return result if isinstance(result, str) else text


def _redact(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return {_redact(k, pattern): _redact(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, pattern) for v in value]
    return value


#: Settings whose values are secrets.
SECRET_SETTINGS = (
    "ORCHESTRATOR_SERVICE_TOKEN",
    "ORCHESTRATOR_LLM_API_KEY",
    "ORCHESTRATOR_SERVICE_JWT_KEY",
    "GEMINI_API_KEY",  # the LLM router's Gemini fallback
)

#: Most secrets :func:`register_secret` remembers per process (the oldest are forgotten first).
MAX_REGISTERED_SECRETS = 256

# Secrets met at run time in this process (credential values resolved for steps), kept in
# insertion order so the oldest can be dropped.
_registered: dict[str, None] = {}
_registered_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember ``value`` as a secret of this process: :func:`known_secrets` returns it from now on.

    Called when a credential is decrypted for a step (``agents.credentials.resolve``), so the
    traces, errors, outputs and log lines that this process writes afterwards are masked. Values
    shorter than ``MIN_SECRET_LENGTH`` are ignored.
    """
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        return
    with _registered_lock:
        _registered.pop(value, None)
        _registered[value] = None
        while len(_registered) > MAX_REGISTERED_SECRETS:
            _registered.pop(next(iter(_registered)))


def forget_registered_secrets() -> None:
    """Forget what :func:`register_secret` remembered (tests)."""
    with _registered_lock:
        _registered.clear()


def known_secrets() -> list[str]:
    """The secrets to mask: the configured ones (``SECRET_SETTINGS`` that are set) and those
    registered at run time in this process (:func:`register_secret`)."""
    configured = [value for name in SECRET_SETTINGS if (value := getattr(settings, name, "") or "")]
    with _registered_lock:
        return configured + list(_registered)
