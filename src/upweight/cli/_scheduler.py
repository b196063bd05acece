"""``--scheduler local|tcp://HOST:PORT``: the Dask executor of a command, opened for its duration.

``check_scheduler`` is called before any work: a malformed address or a missing Dask install
is reported at once, not after the model has been trained.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from .. import errors
from .._executor import Executor

#: address schemes of dask.distributed's comms that reach a scheduler over the network
SCHEMES = ("tcp", "tls", "ws", "wss")
_FORM = (
    "pass 'local' (a cluster on this machine) or a scheduler address such as tcp://127.0.0.1:8786"
)


def _bad(value: str, why: str) -> errors.InputError:
    return errors.InputError(f"--scheduler {value!r}: {why}; {_FORM}.")


def check_address(value: str) -> None:
    """Refuse a ``--scheduler`` value that is neither ``local`` nor ``[SCHEME://]HOST:PORT``.

    SCHEME is one of tcp, tls, ws, wss (tcp when left out); HOST a name, an IPv4 address or an
    IPv6 address in brackets; PORT an integer 1–65535.

    Raises:
        InputError: naming the value, what is wrong with it and the accepted form.

    Examples:
        >>> check_address("tcp://10.0.0.5:8786"); check_address("local")
        >>> check_address("[::1]:8786")
        >>> check_address("tcp://")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        upweight.errors.InputError: --scheduler 'tcp://': no host; pass 'local' ...
    """
    if value == "local":
        return
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    if scheme not in SCHEMES:
        raise _bad(value, f"unknown scheme {scheme!r} (use one of {', '.join(SCHEMES)})")
    rest = rest.rstrip("/")
    if not rest:
        raise _bad(value, "no host")
    if rest.startswith("["):  # [IPv6]:port
        host, bracket, port = rest[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise _bad(value, "an IPv6 host must be written [ADDRESS]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(value, f"{host!r} is not an IPv6 address") from None
        port = port[1:]
    else:
        host, colon, port = rest.rpartition(":")
        if not colon:
            raise _bad(value, "no port (a scheduler listens on e.g. 8786)")
        if not host:
            raise _bad(value, "no host")
        if ":" in host or "/" in host or any(c.isspace() for c in host):
            raise _bad(value, f"{host!r} is not a host name or IPv4 address")
    if not port.isdigit():
        raise _bad(
            value,
            (
                f"the port {port!r} is not a number"
                if port
                else "no port (a scheduler listens on e.g. 8786)"
            ),
        )
    if not 1 <= int(port) <= 65535:
        raise _bad(value, f"the port {int(port)} is out of range (1–65535)")


def check_scheduler(value: str | None) -> None:
    """Before any work: the address is well formed and dask.distributed can be imported.

    Raises:
        InputError: a malformed address (``check_address``).
        ModuleNotFoundError: dask.distributed is not installed (the command line turns it into
            a one-line message naming ``pip install 'upweight[dask]'``).
    """
    if value is None:
        return
    check_address(value)
    import distributed  # noqa: F401  (a missing install is reported now, not after training)


def open_executor(stack: contextlib.ExitStack, scheduler: str | None, say: Any) -> Executor | None:
    """``None`` (work in this process) without ``--scheduler``; else a ``DaskExecutor`` closed with
    ``stack``."""
    if scheduler is None:
        return None
    check_address(scheduler)
    from ..distributed import DaskExecutor

    try:
        executor = stack.enter_context(DaskExecutor(scheduler))
    except errors.UpweightError:
        raise
    except ValueError as exc:  # an address dask.distributed itself refuses
        raise _bad(scheduler, f"dask.distributed refuses it ({exc})") from exc
    say(f"Dask: {executor}")
    return executor
