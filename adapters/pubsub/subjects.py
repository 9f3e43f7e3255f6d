"""NATS subject syntax, the one meaning every PubSub backend gives to subjects and patterns.

A subject is dot-separated non-empty tokens without whitespace. A pattern may use ``*`` as a
whole token (exactly one token) and ``>`` as the last token (one or more trailing tokens).
"""

from __future__ import annotations

from prism.errors import invalid_argument

MAX_SUBJECT_LENGTH = 1024


def _tokens(field: str, text: str) -> list[str]:
    if not text:
        raise invalid_argument(field, "must not be empty")
    if len(text) > MAX_SUBJECT_LENGTH:
        raise invalid_argument(field, f"longer than {MAX_SUBJECT_LENGTH} characters")
    if any(c.isspace() for c in text):
        raise invalid_argument(field, f"{text!r} contains whitespace")
    tokens = text.split(".")
    if "" in tokens:
        raise invalid_argument(field, f"{text!r} has an empty token (leading, trailing or double dot)")
    return tokens


def parse_subject(text: str, field: str = "subject") -> tuple[str, ...]:
    """A concrete subject to publish to: no wildcards."""
    tokens = _tokens(field, text)
    for token in tokens:
        if "*" in token or ">" in token:
            raise invalid_argument(field, f"{text!r}: wildcards are not allowed when publishing")
    return tuple(tokens)


def parse_pattern(text: str, field: str = "subject") -> tuple[str, ...]:
    """A subscription pattern: ``*`` a whole token, ``>`` only as the last token."""
    tokens = _tokens(field, text)
    for i, token in enumerate(tokens):
        if token == ">" and i != len(tokens) - 1:
            raise invalid_argument(field, f"{text!r}: '>' must be the last token")
        if token not in ("*", ">") and ("*" in token or ">" in token):
            raise invalid_argument(field, f"{text!r}: a wildcard must be a whole token")
    return tuple(tokens)


def matches(pattern: tuple[str, ...], subject: tuple[str, ...]) -> bool:
    for i, token in enumerate(pattern):
        if token == ">":
            return len(subject) > i
        if i >= len(subject) or (token != "*" and token != subject[i]):
            return False
    return len(pattern) == len(subject)
