"""What a benchmark's machine table says about the CPU beyond its name."""

from __future__ import annotations

from pathlib import Path


def bfloat16_support(cpuinfo: str = "/proc/cpuinfo") -> str:
    """Whether the CPU multiplies bfloat16 natively (the AVX512-BF16 and AMX-BF16 flags of
    /proc/cpuinfo): hosts of the same CPU name differ here, and a bfloat16 timing is read against
    this — without it torch emulates bfloat16 products, slower than float32."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "unknown"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return "native (" + ", ".join(native) + ")"
    return "emulated (no avx512_bf16 or amx_bf16 flag)" if flags else "unknown"
