"""Exceptions as one line of text, for logs and error messages."""
from __future__ import annotations

import asyncio

# Causes describe_error leaves out: the CancelledError behind every asyncio timeout says nothing.
_NOISE = (asyncio.CancelledError, GeneratorExit)


def describe_error(exc: BaseException, context: bool = True) -> str:
    """One line for a log or an error message: "Type: message", then each cause in the chain
    ("; caused by ..." for `raise ... from`, and with context=True "; while handling ..." for an
    exception raised while another was being handled, as a traceback shows them).

    Why: several errors carry no message at all (TimeoutError from asyncio.timeout, PoolTimeout
    from a pool that never connected), and `"%s" % exc` then printed nothing ("worker stopped: ").
    Multi-line messages (libpq's "...\n\tIs the server running...") are joined into one line. A
    cause that adds nothing (its message already shown, or the CancelledError behind a timeout)
    is left out."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = " ".join(line.strip() for line in str(current).splitlines() if line.strip())
        name = type(current).__name__
        shown = "".join(parts)
        if not parts:
            parts.append(f"{name}: {message}" if message else name)
        elif not isinstance(current, _NOISE) and (
                (message and message not in shown) or (not message and name not in shown)):
            parts.append(f"{link}{name}: {message}" if message else f"{link}{name}")
        if current.__cause__ is not None:
            current, link = current.__cause__, "; caused by "
        elif context and current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "; while handling "
        else:
            current = None
    return "".join(parts)
