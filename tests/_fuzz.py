"""Model fuzzer: seeded mutations of sample models' bytes and graph structure, and a runner that executes
`onnxslim` commands on each mutant in a forked child with a timeout.

A mutant passes when every command exits 0, 1 or 2, prints no traceback, finishes within its timeout, and a
command that exits 2 wrote no output file. Used by tests/test_fuzz.py (a small hypothesis-driven budget) and
bench/fuzz/run_fuzz.py (the long run by hand).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import AttributeProto, TensorProto

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"

# Values that break assumptions: negative, zero, huge, overflowing int64/int32.
_BAD_INTS = [-(2**63), -(2**31), -7, -1, 0, 1, 3, 2**31 - 1, 2**31, 2**40, 2**62]
_OPS = ["Add", "Relu", "Conv", "Gemm", "MatMul", "Reshape", "Concat", "If", "Loop", "Gather", "NoSuchOp", "Split"]
_DOMAINS = ["", "ai.onnx.ml", "com.microsoft", "com.fuzz", "ai.onnx.preview.training"]


def sample_model_names() -> list[str]:
    return [m["name"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]]


# --------------------------------------------------------------------------------------------- mutators


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def _pick_graph(m: onnx.ModelProto, rng: random.Random, need_nodes: bool = True) -> onnx.GraphProto | None:
    gs = [g for g in _graphs(m.graph) if g.node or not need_nodes]
    return rng.choice(gs) if gs else None


def _tensor_names(g: onnx.GraphProto) -> list[str]:
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    for n in g.node:
        names.extend(o for o in n.output if o)
    return names or ["x"]


def m_drop_node(m, rng):
    g = _pick_graph(m, rng)
    if g is not None:
        del g.node[rng.randrange(len(g.node))]


def m_rewire_input(m, rng):
    g = _pick_graph(m, rng)
    if g is None:
        return
    n = rng.choice(g.node)
    if n.input:
        n.input[rng.randrange(len(n.input))] = rng.choice(_tensor_names(g) + ["fuzz_undefined", ""])
    else:
        n.input.append(rng.choice(_tensor_names(g)))


def m_rewire_output(m, rng):
    g = _pick_graph(m, rng)
    if g is None:
        return
    n = rng.choice(g.node)
    if n.output:
        n.output[rng.randrange(len(n.output))] = rng.choice(_tensor_names(g) + ["", "fuzz_out"])


def m_op_type(m, rng):
    g = _pick_graph(m, rng)
    if g is not None:
        rng.choice(g.node).op_type = rng.choice(_OPS)


def m_domain(m, rng):
    g = _pick_graph(m, rng)
    if g is not None:
        rng.choice(g.node).domain = rng.choice(_DOMAINS)


def m_attribute(m, rng):
    g = _pick_graph(m, rng)
    if g is None:
        return
    n = rng.choice(g.node)
    if not n.attribute or rng.random() < 0.2:
        n.attribute.append(
            onnx.helper.make_attribute(rng.choice(["axis", "fuzz", "perm", "to"]), rng.choice(_BAD_INTS))
        )
        return
    a = rng.choice(n.attribute)
    kind = rng.randrange(4)
    if kind == 0:
        n.attribute.remove(a)
    elif a.type == AttributeProto.INT:
        a.i = rng.choice(_BAD_INTS)
    elif a.type == AttributeProto.INTS:
        vals = list(a.ints)
        choice = rng.randrange(3)
        if choice == 0 and vals:
            vals[rng.randrange(len(vals))] = rng.choice(_BAD_INTS)
        elif choice == 1:
            vals = vals + [rng.choice(_BAD_INTS)]
        else:
            vals = vals[: rng.randrange(len(vals) + 1)]
        del a.ints[:]
        a.ints.extend(vals)
    elif a.type == AttributeProto.FLOAT:
        a.f = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e38])
    elif a.type == AttributeProto.STRING:
        a.s = rng.choice([b"", b"\xff\xfe", b"NOTSET", b"x" * 100])
    elif a.type == AttributeProto.TENSOR:
        _mutate_tensor(a.t, rng)
    elif a.type == AttributeProto.GRAPH:
        del a.g.node[: rng.randrange(len(a.g.node) + 1)]
    else:
        a.type = rng.choice([0, AttributeProto.INT, AttributeProto.GRAPH, AttributeProto.FLOATS])


def _mutate_tensor(t: onnx.TensorProto, rng: random.Random) -> None:
    kind = rng.randrange(6)
    if kind == 0:
        t.data_type = rng.choice([0, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.STRING, TensorProto.BOOL, 99])
    elif kind == 1 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice(_BAD_INTS)
    elif kind == 2:
        t.dims.append(rng.choice([0, 1, 2, 60000]))
    elif kind == 3 and t.raw_data:
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)]
    elif kind == 4:
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (
            ("location", rng.choice(["missing.bin", "../escape.bin", "/etc/passwd", "model.onnx", ".", ""])),
            ("offset", str(rng.choice([0, 7, 2**40, -5]))),
            ("length", str(rng.choice([4, 2**40, -1]))),
        ):
            e = t.external_data.add()
            e.key, e.value = k, v
    else:
        t.ClearField("raw_data")
        t.float_data.extend([float("nan")] * rng.randrange(1, 4))


def m_initializer(m, rng):
    g = rng.choice([g for g in _graphs(m.graph)])
    if g.initializer:
        _mutate_tensor(rng.choice(g.initializer), rng)


def m_opset(m, rng):
    if m.opset_import:
        op = rng.choice(m.opset_import)
        op.version = rng.choice([-1, 0, 1, 6, 9, 11, 13, 21, 25, 99, 2**40])
        if rng.random() < 0.2:
            op.domain = rng.choice(_DOMAINS)
    if rng.random() < 0.3:
        m.ir_version = rng.choice([0, 1, 3, 99, -1])


def m_io_type(m, rng):
    g = m.graph
    vis = list(g.input) + list(g.output) + list(g.value_info)
    if not vis:
        return
    v = rng.choice(vis)
    tt = v.type.tensor_type
    kind = rng.randrange(4)
    if kind == 0:
        tt.elem_type = rng.choice([0, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.STRING, 99])
    elif kind == 1 and tt.shape.dim:
        d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        if rng.random() < 0.5:
            d.dim_value = rng.choice([-3, 0, 1, 7, 2**40])
        else:
            d.dim_param = rng.choice(["", "fuzz", "batch", "\u00e9"])
    elif kind == 2:
        tt.shape.dim.add().dim_value = rng.choice([1, 5])
    else:
        v.type.ClearField("tensor_type")


def m_outputs(m, rng):
    g = m.graph
    kind = rng.randrange(4)
    if kind == 0 and g.output:
        del g.output[rng.randrange(len(g.output))]
    elif kind == 1 and g.output:
        g.output.append(g.output[0])
    elif kind == 2 and g.output and g.input:
        g.output[rng.randrange(len(g.output))].name = rng.choice(g.input).name
    elif g.input:
        del g.input[rng.randrange(len(g.input))]


def m_reorder(m, rng):
    g = _pick_graph(m, rng)
    if g is None or len(g.node) < 2:
        return
    nodes = list(g.node)
    if rng.random() < 0.5:
        nodes.reverse()
    else:
        nodes.insert(rng.randrange(len(nodes)), nodes[rng.randrange(len(nodes))])  # a second producer
    del g.node[:]
    g.node.extend(nodes)


def m_strings(m, rng):
    bad = rng.choice(["", "\x00", "a" * 5000, "\u202e\u00e9", "../../x", "con"])
    kind = rng.randrange(3)
    if kind == 0:
        m.doc_string = bad
    elif kind == 1:
        e = m.metadata_props.add()
        e.key, e.value = rng.choice(["", "k", "onnxslim"]), bad
    else:
        g = _pick_graph(m, rng)
        if g is not None:
            rng.choice(g.node).name = bad


STRUCTURAL: dict[str, Callable[[onnx.ModelProto, random.Random], None]] = {
    "drop_node": m_drop_node,
    "rewire_input": m_rewire_input,
    "rewire_output": m_rewire_output,
    "op_type": m_op_type,
    "domain": m_domain,
    "attribute": m_attribute,
    "initializer": m_initializer,
    "opset": m_opset,
    "io_type": m_io_type,
    "outputs": m_outputs,
    "reorder": m_reorder,
    "strings": m_strings,
}


def b_flip(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randrange(1, 9)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def b_truncate(raw: bytes, rng: random.Random) -> bytes:
    return raw[: rng.randrange(len(raw))]


def b_insert(raw: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(raw) + 1)
    return raw[:i] + rng.randbytes(rng.randrange(1, 64)) + raw[i:]


def b_splice(raw: bytes, rng: random.Random) -> bytes:
    i, j = sorted(rng.randrange(len(raw)) for _ in range(2))
    k = rng.randrange(len(raw))
    return raw[:k] + raw[i : j + 1] + raw[k:]


BYTES: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip": b_flip,
    "truncate": b_truncate,
    "insert": b_insert,
    "splice": b_splice,
}


def mutate(raw: bytes, seed: int) -> tuple[bytes, list[str]]:
    """A mutant of serialized model ``raw``: 1-3 structural mutations, sometimes followed by a byte mutation."""
    rng = random.Random(seed)
    applied: list[str] = []
    m = onnx.ModelProto()
    m.ParseFromString(raw)
    for _ in range(rng.randrange(1, 4)):
        name = rng.choice(sorted(STRUCTURAL))
        STRUCTURAL[name](m, rng)
        applied.append(name)
    out = m.SerializeToString()
    if rng.random() < 0.3:
        name = rng.choice(sorted(BYTES))
        out = BYTES[name](out, rng)
        applied.append("bytes_" + name)
    return out, applied


# --------------------------------------------------------------------------------------------- runner


@dataclass
class CommandResult:
    argv: list[str]
    rc: int | None  # None: killed after the timeout
    seconds: float
    stderr_tail: str
    problems: list[str] = field(default_factory=list)


def run_cli(argv: list[str], timeout: float, workdir: Path) -> tuple[int | None, str, float]:
    """``onnxslim.cli.main(argv)`` in a forked child (imports already paid for) with a wall-clock timeout."""
    from onnxslim import cli

    err_path = workdir / f"stderr.{os.getpid()}.{time.monotonic_ns()}"
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller (pytest, the bench loop)
        rc = 98
        try:
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            rc = cli.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:
            import traceback

            traceback.print_exc()
            rc = 99
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(rc if isinstance(rc, int) else 97)
    deadline = t0 + timeout
    rc: int | None = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    seconds = time.monotonic() - t0
    try:
        err = err_path.read_text(errors="replace")
        err_path.unlink()
    except OSError:
        err = ""
    return rc, err, seconds


def commands_for(mutant: Path, name: str, out: Path) -> list[list[str]]:
    model_dir = SAMPLES / name
    eval_dir = model_dir / "eval"
    return [
        ["info", str(mutant)],
        ["optimize", str(mutant), "-o", str(out), "--check-data", str(eval_dir), "--max-samples", "4", "-q"],
        ["check", str(model_dir / "model.onnx"), str(mutant), "--data", str(eval_dir), "--max-samples", "4", "-q"],
    ]


def run_mutant(name: str, seed: int, timeout: float = 60.0) -> tuple[list[str], list[CommandResult]]:
    """Mutate sample model ``name`` with ``seed`` and run every command on it; problems are listed per command."""
    raw = (SAMPLES / name / "model.onnx").read_bytes()
    data, applied = mutate(raw, seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxslim-fuzz-") as tmp:
        work = Path(tmp)
        mutant = work / "mutant.onnx"
        mutant.write_bytes(data)
        out = work / "out.onnx"
        for argv in commands_for(mutant, name, out):
            out.unlink(missing_ok=True)
            rc, err, seconds = run_cli(argv, timeout, work)
            r = CommandResult(argv, rc, seconds, err[-2000:])
            if rc is None:
                r.problems.append(f"hang: killed after {timeout:g} s")
            elif rc not in (0, 1, 2):
                r.problems.append(f"exit {rc}")
            if "Traceback (most recent call last)" in err:
                r.problems.append("traceback on stderr")
            if rc == 2 and "onnxslim: error:" not in err:
                r.problems.append("exit 2 without an 'onnxslim: error:' line")
            if rc == 2 and argv[0] == "optimize" and out.exists():
                r.problems.append("exit 2 but the output was written")
            if mutant.read_bytes() != data:
                r.problems.append("the input model was modified")
            results.append(r)
    return applied, results
