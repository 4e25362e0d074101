"""What the automatic search can do to one layer: the menu of levels, and a configuration turned into passes.

A level is one technique at one strength for one weight layer (Conv / ConvTranspose / Gemm / MatMul with a
constant weight): ``float`` (left as it is), ``int8`` (quantize_int8_static), ``w8`` (int8 weights, float
activations: what the int8 revert track gives a layer back to first), ``shareB`` (share_weights at B
bits), ``pruneS+shareB`` (prune_by_magnitude at sparsity S, then B-bit codes whose zeros cost one mask bit) or
``pruneS`` (pruned, stored packed); any of the last three ``+int8`` (stacked: int8 activations, and the codebook
or the surviving weights int8, e.g. ``share4+int8``). A configuration maps layer names to levels; ``build_passes``
turns it into the real passes with per-layer options, so a candidate is always made by the same code users run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..weight_layout import WEIGHT_INPUT

__all__ = [
    "Level",
    "FLOAT",
    "W8",
    "by_name",
    "parse_levels",
    "DEFAULT_LEVELS",
    "WeightLayer",
    "weight_layers",
    "build_passes",
]

# share2 is gone from the default: on every real model all-share2 lost 6-100 points, and a sixth level costs a
# probe per layer; share5/share6 give the search steps near lossless (YOLOv8n all share5: 1.000 at 0.19x)
DEFAULT_LEVELS = "int8,share6,share5,share4,share3"


@dataclass(frozen=True)
class Level:
    name: str
    int8: bool = False
    bits: int = 0  # share_weights index bits (0: not shared)
    sparsity: float = 0.0  # prune_by_magnitude
    weight_only: bool = False  # int8 weights, float activations (quantize_int8_static's weight_only_nodes)

    def bytes(self, n: int, rows: int = 0) -> float:
        """Estimated stored bytes of an n-element fp32 weight with ``rows`` output channels at this level (what
        the search trades)."""
        if self.bits:  # one codebook and a scale per row; stacked under int8, a row's int8 table of 2^b values
            k = 2**self.bits
            codebook = (rows * k if self.int8 else 4.0 * k) + 4.0 * rows
            if self.sparsity:
                return n / 8 + n * (1 - self.sparsity) * self.bits / 8 + codebook
            return n * self.bits / 8 + codebook
        value = 1.0 if self.int8 else 4.0
        if self.sparsity:
            return n / 8 + value * n * (1 - self.sparsity)
        return value * n


FLOAT = Level("float")
W8 = Level("w8", int8=True, weight_only=True)
_LEVEL = re.compile(r"^(?:prune(?P<s>0?\.\d+))?\+?(?:share(?P<b>[2-8]))?(?P<q>\+int8)?$")


def parse_levels(text: str) -> list[Level]:
    """``"int8,share4,prune0.5+share4"`` -> levels, ordered from the largest estimated size to the smallest."""
    out: list[Level] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token == "int8":
            out.append(Level("int8", int8=True))
            continue
        if token == "w8":
            out.append(W8)
            continue
        m = _LEVEL.match(token)
        if not m or not (m.group("s") or m.group("b")):
            raise ValueError(
                f"unknown level {token!r}: write int8, w8, shareB (B in 2..8), pruneS or pruneS+shareB, "
                "optionally +int8 (e.g. share4+int8)"
            )
        s = float(m.group("s") or 0.0)
        if not 0.0 <= s < 1.0:
            raise ValueError(f"level {token!r}: sparsity must be in [0, 1)")
        out.append(Level(token, int8=bool(m.group("q")), bits=int(m.group("b") or 0), sparsity=s))
    if not out:
        raise ValueError("no levels given; e.g. int8,share4,share3")
    names = [x.name for x in out]
    if len(set(names)) != len(names):
        raise ValueError(f"levels repeat: {text!r}")
    return sorted(out, key=lambda x: -x.bytes(1 << 16))


def by_name(menu: list[Level]) -> dict[str, Level]:
    """Level name -> level: the menu's, plus ``float`` and ``w8`` (the revert track's, in any menu)."""
    return {FLOAT.name: FLOAT, W8.name: W8, **{lv.name: lv for lv in menu}}


@dataclass(frozen=True)
class WeightLayer:
    name: str  # node name
    op: str
    weight: str  # initializer name
    size: int  # weight elements
    rows: int = 0  # output channels (share_weights keeps one scale per row)


def weight_layers(model: onnx.ModelProto, min_weights: int) -> list[WeightLayer]:
    """The main graph's named weight layers whose weight is an initializer of at least ``min_weights``
    elements, in graph order (unnamed nodes cannot be addressed by the passes' per-layer options)."""
    inits = {t.name: t for t in model.graph.initializer}
    seen: set[str] = set()
    out = []
    for node in model.graph.node:
        idx = WEIGHT_INPUT.get(node.op_type)
        if idx is None or not node.name or node.name in seen or len(node.input) <= idx:
            continue
        t = inits.get(node.input[idx])
        if t is None:
            continue
        n = 1
        for d in t.dims:
            n *= d
        if n >= min_weights:
            seen.add(node.name)
            out.append(WeightLayer(node.name, node.op_type, t.name, n, _rows(node, list(t.dims))))
    return out


def _rows(node: onnx.NodeProto, dims: list[int]) -> int:
    """Output channels of a weight as share_weights sees them (Conv: dim 0, ConvTranspose: dim 1 x group,
    MatMul: the last dim, Gemm: by transB, Gather: the embedding features); an estimate for the size ranking."""
    if not dims:
        return 0
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "ConvTranspose" and len(dims) > 1:
        return dims[1] * int(attrs.get("group", 1))
    if node.op_type == "Gather":
        return int(np.prod(dims[1:])) if len(dims) > 1 else 1
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0)):
        return dims[-1]
    return dims[0]


def _exact(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


def build_passes(
    config: Mapping[str, Level], layers: list[WeightLayer], *, seed: int = 0, distill: bool = False
) -> list:
    """The passes that apply ``config`` (layer name -> level; absent = float) to a model holding ``layers``.
    ``config`` may also name other nodes at ``float``: the int8 quantizer leaves them float (an activation-only
    node such as a head's Concat or Sigmoid, given back by the int8 revert ranking)."""
    from ..registry import get_pass

    everyone = [x.name for x in layers]
    level_of = {x: config.get(x, FLOAT) for x in everyone}
    float_nodes = [x for x, lv in config.items() if x not in level_of and not (lv.int8 or lv.bits or lv.sparsity)]
    passes = []
    pruned = {x: lv for x, lv in level_of.items() if lv.sparsity}
    if pruned:
        passes.append(
            get_pass("prune_by_magnitude")(
                sparsity=max(lv.sparsity for lv in pruned.values()),
                layer_sparsity=[f"{_exact(x)}={lv.sparsity}" for x, lv in pruned.items()],
                exclude_nodes=[_exact(x) for x in everyone if x not in pruned],
                allocation="uniform",
                keep_first_last=False,
                min_weights=0,
            )
        )
    shared = {x: lv for x, lv in level_of.items() if lv.bits}
    if shared:
        passes.append(
            get_pass("share_weights")(
                bits=max(lv.bits for lv in shared.values()),
                layer_bits=[f"{_exact(x)}={lv.bits}" for x, lv in shared.items()],
                exclude_nodes=[_exact(x) for x in everyone if x not in shared],
                op_types=list(WEIGHT_INPUT),  # the layers the search knows (not recurrent W/R)
                keep_first_last=False,
                min_weights=0,
            )
        )
    quantized = [x for x, lv in level_of.items() if lv.int8]
    if quantized:
        kept = [x for x in everyone if x not in quantized] + float_nodes
        weight_only = [x for x in quantized if level_of[x].weight_only]
        passes.append(get_pass("quantize_int8_static")(exclude_nodes=kept, weight_only_nodes=weight_only))
    if distill and passes:
        passes.append(get_pass("distill_layers")())
    if pruned and any(not lv.bits for lv in pruned.values()):  # last: distillation reads plain pruned weights
        passes.append(get_pass("pack_sparse_weights")())
    return passes
