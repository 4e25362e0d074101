"""Private helper of quantize_int8_static: hardware-aware defaults (target CPU -> weight range, activation type).

Why: onnxruntime's x86 int8 kernels without VNNI multiply uint8 activations by int8 weights with AVX2
``vpmaddubsw``, which adds two u8*s8 products into a *saturating int16*: 255*127*2 = 64770 > 32767, so large
activations times large weights clip. onnxruntime documents ``reduce_range`` (7-bit weights, [-64, 63]) as
the fix; with it the pair sum is at most 255*63*2 = 32130. VNNI (AVX512-VNNI, AVX-VNNI) accumulates into
int32 directly, so full 8-bit weights are safe there. ARM's int8 dot product (``sdot``, cpuinfo flag
``asimddp``) and its fallback both prefer signed x signed (s8s8), so on ARM activations become int8.

Targets: x86-vnni (uint8 activations, 8-bit weights), x86-avx2 (uint8, reduce_range), arm-dotprod and arm
(int8 activations, 8-bit weights), generic (uint8, 8-bit weights: onnxruntime's own QDQ defaults).
``auto`` reads this machine's /proc/cpuinfo (deterministic for a given machine; no environment variables).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TARGETS",
    "HardwareChoice",
    "detect_target",
    "host_target",
    "resolve_hardware",
    "target_settings",
    "REDUCED_WEIGHT_QMAX",
]

TARGETS = ("auto", "x86-vnni", "x86-avx2", "arm-dotprod", "arm", "generic")
REDUCED_WEIGHT_QMAX = 63  # 7-bit symmetric weights: [-63, 63] inside onnxruntime's reduce_range [-64, 63]

_X86_VNNI_FLAGS = {"avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni"}
_ARM_DOT_FLAGS = {"asimddp", "dotprod"}
_X86_MACHINES = {"x86_64", "amd64", "i386", "i686", "x86"}
_ARM_MACHINES = {"aarch64", "arm64", "armv8l", "armv8", "armv7l", "arm"}


@dataclass(frozen=True)
class HardwareChoice:
    target: str  # the resolved target (never "auto")
    detected: bool  # True when it came from this machine (target=auto)
    reduce_range: bool
    activations: str  # "uint8" | "int8"
    flags: tuple[str, ...] = ()  # the deciding CPU flags this machine has (when detected)
    flags_checked: tuple[str, ...] = ()  # the ones looked for

    def note(self) -> str:
        how = "detected on this machine" if self.detected else "given"
        weights = "7-bit weights [-64, 63] (reduce_range)" if self.reduce_range else "8-bit weights"
        text = f"target {self.target} ({how}): {self.activations} activations, {weights}"
        if self.detected and self.flags_checked:
            absent = [f for f in self.flags_checked if f not in self.flags]
            text += f"; CPU flags: {' '.join(self.flags) or 'none of those checked'}"
            text += f" (absent: {' '.join(absent)})" if absent else ""
        return text


def _flags(cpuinfo: str) -> set[str]:
    """Every word on the 'flags' (x86) / 'Features' (ARM) lines of a /proc/cpuinfo text, lower case."""
    out: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            out.update(w.lower() for w in value.split())
    return out


def detect_target(cpuinfo: str, machine: str = "") -> str:
    """The target for a machine described by its /proc/cpuinfo text and ``platform.machine()``.

    The architecture comes from ``machine`` when known, else from the cpuinfo text itself (x86 lists
    'vendor_id'/'flags', ARM 'CPU implementer'/'Features').
    """
    flags = _flags(cpuinfo)
    m = machine.strip().lower()
    if m in _X86_MACHINES:
        arch = "x86"
    elif m in _ARM_MACHINES or m.startswith("arm") or m.startswith("aarch64"):
        arch = "arm"
    elif "cpu implementer" in cpuinfo.lower() or "asimd" in flags:
        arch = "arm"
    elif "vendor_id" in cpuinfo.lower() or "sse2" in flags:
        arch = "x86"
    else:
        return "generic"
    if arch == "x86":
        if flags & _X86_VNNI_FLAGS:
            return "x86-vnni"
        return "x86-avx2" if "avx2" in flags else "generic"  # pre-AVX2 x86: SSE kernels, no u8s8 int16 trap
    return "arm-dotprod" if flags & _ARM_DOT_FLAGS else "arm"


def host_target(cpuinfo_path: str | Path = "/proc/cpuinfo") -> str:
    """This machine's target (``generic`` when its cpuinfo cannot be read, e.g. on macOS or Windows)."""
    machine = platform.machine()
    try:
        text = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        text = ""
    if not text:
        m = machine.lower()
        # Apple silicon and Windows on ARM all have the dot-product extension; other x86 stays generic.
        return "arm-dotprod" if m in ("arm64", "aarch64") and platform.system() == "Darwin" else "generic"
    return detect_target(text, machine)


def target_settings(target: str) -> tuple[bool, str]:
    """(reduce_range, activation type) for a resolved target."""
    table = {
        "x86-vnni": (False, "uint8"),
        "x86-avx2": (True, "uint8"),
        "arm-dotprod": (False, "int8"),
        "arm": (False, "int8"),
        "generic": (False, "uint8"),
    }
    if target not in table:
        raise ValueError(f"unknown target '{target}'; use one of {', '.join(TARGETS)}")
    return table[target]


def resolve_hardware(
    target: str, reduce_range: bool | None, activations: str, cpuinfo_path: str | Path = "/proc/cpuinfo"
) -> HardwareChoice:
    """The settings the pass uses: the target's defaults, overridden by an explicit ``reduce_range`` and by
    ``activations`` other than ``auto``."""
    detected = target == "auto"
    resolved = host_target(cpuinfo_path) if detected else target
    rr, act = target_settings(resolved)
    if reduce_range is not None:
        rr = bool(reduce_range)
    if activations != "auto":
        act = activations
    have, checked = deciding_flags(cpuinfo_path) if detected else ((), ())
    return HardwareChoice(resolved, detected, rr, act, have, checked)


def deciding_flags(cpuinfo_path: str | Path = "/proc/cpuinfo", machine: str | None = None) -> tuple[tuple, tuple]:
    """(the flags that decide the target which this machine has, the flags looked for), both sorted."""
    m = (platform.machine() if machine is None else machine).strip().lower()
    if m in _X86_MACHINES:
        checked = _X86_VNNI_FLAGS | {"avx2"}
    elif m in _ARM_MACHINES or m.startswith(("arm", "aarch64")):
        checked = set(_ARM_DOT_FLAGS)
    else:
        checked = _X86_VNNI_FLAGS | {"avx2"} | _ARM_DOT_FLAGS
    try:
        flags = _flags(Path(cpuinfo_path).read_text(errors="replace"))
    except OSError:
        flags = set()
    return tuple(sorted(flags & checked)), tuple(sorted(checked))
