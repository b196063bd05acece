"""``--device NAME``: the torch device a command computes on, checked before any work.

A name torch does not know, or a device this machine does not have, is reported at once (not after
the data are loaded), with the way out.
"""

from __future__ import annotations

import torch

from .. import errors


def check_device(value: str | None) -> torch.device | None:
    """The ``torch.device`` named by ``--device`` (``None`` if the option was not given).

    Raises:
        InputError: the name is not a torch device, or names a CUDA/MPS device that is not here.

    Examples:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("gpu")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        upweight.errors.InputError: --device 'gpu': not a torch device name...
    """
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise errors.InputError(
            f"--device {value!r}: not a torch device name; pass cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise errors.InputError(
                f"--device {value}: this machine has {count} CUDA device(s) that torch can use;"
                " pass --device cpu, or run on a machine with a CUDA GPU and a CUDA build of torch."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise errors.InputError(f"--device {value}: MPS is not available here; pass --device cpu.")
    return device
