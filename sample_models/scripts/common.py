"""Shared helpers for building the onnxslim sample models.

Every ``make_<name>.py`` script trains a small model on data that ships with a
package (scikit-learn's toy data sets or text generated in the script), exports
it to ONNX and then calls :func:`finalize`, which

* stamps ``doc_string`` and ``metadata_props`` on the model,
* checks it with ``onnx.checker.check_model(full_check=True)``,
* writes ``calib/0000.npz..`` and ``eval/0000.npz..`` feed dicts,
* measures the held-out accuracy of the *saved ONNX file* with onnxruntime,
* updates this model's entry in ``sample_models/manifest.json``.

Data format (contract):
  calib/NNNN.npz  one feed dict per file, keys == model input names, batch 1.
  eval/NNNN.npz   one feed dict per file (a batch) plus ``__label__`` (int64 [batch]).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent.parent
MANIFEST = SAMPLE_DIR / "manifest.json"
SEED = 0
N_CALIB = 32
LABEL_KEY = "__label__"
METADATA_SOURCE = "onnxslim sample_models"

# Order of entries in manifest.json (unknown names go last, alphabetically).
MODEL_ORDER = [
    "cnn_digits",
    "transformer_text",
    "gru_digits",
    "sklearn_cancer",
    "wine_ifloop",
    "sklearn_wine_tree",
]

_NP_FROM_ONNX = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
}


# --------------------------------------------------------------------------- #
# seeding / environment
# --------------------------------------------------------------------------- #
def seed_everything(seed: int = SEED) -> np.random.Generator:
    """Seed python, numpy (and torch when it is importable); single thread."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # sklearn / onnx.helper scripts do not need torch
        torch = None
    if torch is not None:
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    return np.random.default_rng(seed)


def strip_local_version(v: str) -> str:
    return v.split("+", 1)[0]


# --------------------------------------------------------------------------- #
# data splits
# --------------------------------------------------------------------------- #
def split_indices(labels: np.ndarray, test_fraction: float = 0.25, seed: int = SEED):
    """Stratified, seeded train/test split of ``range(len(labels))``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(tr), np.sort(te)


def calib_indices(n_train: int, n: int = N_CALIB, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.choice(n_train, size=min(n, n_train), replace=False))


# --------------------------------------------------------------------------- #
# npz writing (byte-reproducible: fixed zip timestamps)
# --------------------------------------------------------------------------- #
def save_npz(path: Path, arrays: dict) -> None:
    """Like ``np.savez_compressed`` but with fixed timestamps (reproducible bytes)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _reset_dir(d: Path) -> Path:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def write_feed_dir(d: Path, feeds: list[dict]) -> int:
    _reset_dir(d)
    for i, feed in enumerate(feeds):
        save_npz(d / f"{i:04d}.npz", feed)
    return len(feeds)


def batch_feeds(inputs: dict, labels: np.ndarray, batch_size: int) -> list[dict]:
    """Split aligned input arrays + labels into eval feed dicts."""
    n = len(labels)
    feeds = []
    for s in range(0, n, batch_size):
        feed = {k: np.ascontiguousarray(v[s : s + batch_size]) for k, v in inputs.items()}
        feed[LABEL_KEY] = np.asarray(labels[s : s + batch_size], dtype=np.int64)
        feeds.append(feed)
    return feeds


def single_feeds(inputs: dict, indices) -> list[dict]:
    """One feed dict (batch 1) per index."""
    return [{k: np.ascontiguousarray(v[i : i + 1]) for k, v in inputs.items()} for i in indices]


# --------------------------------------------------------------------------- #
# model inspection
# --------------------------------------------------------------------------- #
def _subgraphs(node):
    import onnx

    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_nodes(graph):
    for node in graph.node:
        yield node
        for g in _subgraphs(node):
            yield from iter_nodes(g)


def op_counts(model) -> dict:
    c = collections.Counter()
    for n in iter_nodes(model.graph):
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
        c[key] += 1
    return dict(sorted(c.items()))


def _value_info_entry(vi) -> dict:
    import onnx

    tt = vi.type.tensor_type
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return {
        "name": vi.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
        "shape": dims,
    }


def graph_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


# --------------------------------------------------------------------------- #
# evaluation
# --------------------------------------------------------------------------- #
def onnx_accuracy(model_path: Path, eval_dir: Path, label_output: str, kind: str) -> tuple[float, int]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    correct = total = 0
    for f in sorted(Path(eval_dir).glob("*.npz")):
        with np.load(f) as z:
            feed = {k: z[k] for k in in_names}
            y = z[LABEL_KEY]
        (out,) = sess.run([label_output], feed)
        pred = np.argmax(out, axis=-1) if kind == "logits" else np.asarray(out).reshape(-1)
        correct += int((pred.astype(np.int64) == y).sum())
        total += len(y)
    return correct / total, total


def run_all_feeds(model_path: Path, feed_dir: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for f in sorted(Path(feed_dir).glob("*.npz")):
        with np.load(f) as z:
            outs = sess.run(None, {k: z[k] for k in names})
        for o in outs:
            assert np.all(np.isfinite(o)), f"non-finite output for {f}"


def check_feeds(model, feed_dir: Path, with_label: bool) -> None:
    """Assert every npz in feed_dir matches the model's input names/dtypes/ranks."""
    import onnx

    ins = {vi.name: vi for vi in graph_inputs(model)}
    files = sorted(Path(feed_dir).glob("*.npz"))
    assert files, f"no npz in {feed_dir}"
    for f in files:
        with np.load(f) as z:
            keys = set(z.files)
            want = set(ins) | ({LABEL_KEY} if with_label else set())
            assert keys == want, (f, keys, want)
            batch = None
            for name, vi in ins.items():
                a = z[name]
                tt = vi.type.tensor_type
                assert a.dtype == onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), (f, name, a.dtype)
                assert a.ndim == len(tt.shape.dim), (f, name, a.shape)
                for d, s in zip(tt.shape.dim, a.shape):
                    if d.HasField("dim_value"):
                        assert d.dim_value == s, (f, name, a.shape)
                batch = a.shape[0] if batch is None else batch
                assert a.shape[0] == batch
            if with_label:
                assert z[LABEL_KEY].dtype == np.int64 and z[LABEL_KEY].shape == (batch,)
            else:
                assert batch == 1, (f, batch)


# --------------------------------------------------------------------------- #
# finalize: stamp, check, write data, measure, update manifest
# --------------------------------------------------------------------------- #
def stamp_model(model, name: str, doc: str, extra_meta: dict | None = None):
    import onnx

    model.doc_string = doc
    meta = {"source": METADATA_SOURCE, "model": name}
    meta.update(extra_meta or {})
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    return model


def finalize(
    *,
    name: str,
    model,
    exporter: str,
    doc: str,
    calib_feeds: list[dict],
    eval_feeds: list[dict],
    label_output: str,
    label_output_kind: str,
    notes: str,
    min_accuracy: float,
    reference_accuracy: float | None = None,
) -> dict:
    import onnx

    out_dir = SAMPLE_DIR / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"

    stamp_model(model, name, doc)
    domains = [o.domain or "ai.onnx" for o in model.opset_import]
    assert len(domains) == len(set(domains)), f"duplicate opset_import domains: {domains}"
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(model_path), save_as_external_data=False)
    # re-check from disk (no external data, loads cleanly)
    model = onnx.load(str(model_path))
    onnx.checker.check_model(str(model_path), full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), (
        "external data not allowed"
    )

    n_calib = write_feed_dir(out_dir / "calib", calib_feeds)
    write_feed_dir(out_dir / "eval", eval_feeds)
    check_feeds(model, out_dir / "calib", with_label=False)
    check_feeds(model, out_dir / "eval", with_label=True)

    run_all_feeds(model_path, out_dir / "calib")  # every calib file must run too
    acc, n_eval = onnx_accuracy(model_path, out_dir / "eval", label_output, label_output_kind)
    print(f"[{name}] onnxruntime accuracy on {n_eval} held-out samples: {acc:.4f}")
    if reference_accuracy is not None:
        print(f"[{name}] framework (pre-export) accuracy: {reference_accuracy:.4f}")
    assert acc >= min_accuracy, f"{name}: accuracy {acc:.4f} < {min_accuracy}"

    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    counts = op_counts(model)
    entry = {
        "name": name,
        "path": f"{name}/model.onnx",
        "exporter": exporter,
        "opset": opsets.get("ai.onnx"),
        "opset_imports": dict(sorted(opsets.items())),
        "ir_version": model.ir_version,
        "task": "classification",
        "metric": "accuracy",
        "label_output": label_output,
        "label_output_kind": label_output_kind,
        "float_metric": round(acc, 6),
        "calib": f"{name}/calib",
        "eval": f"{name}/eval",
        "n_calib": n_calib,
        "n_eval": n_eval,
        "inputs": [_value_info_entry(vi) for vi in graph_inputs(model)],
        "outputs": [_value_info_entry(vi) for vi in model.graph.output],
        "ops": sorted({n.op_type for n in iter_nodes(model.graph)}),
        "op_counts": counts,
        "size_bytes": model_path.stat().st_size,
        "sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "metadata_props": {p.key: p.value for p in model.metadata_props},
        "notes": notes,
    }
    update_manifest(entry)
    print(f"[{name}] ops: {counts}")
    print(f"[{name}] wrote {model_path} ({entry['size_bytes']} bytes)")
    return entry


def update_manifest(entry: dict) -> None:
    data = {"models": []}
    if MANIFEST.exists():
        data = json.loads(MANIFEST.read_text())
    models = [m for m in data.get("models", []) if m["name"] != entry["name"]]
    models.append(entry)

    def order(m):
        n = m["name"]
        return (MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER), n)

    models.sort(key=order)
    data["models"] = models
    MANIFEST.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- #
# torch helpers
# --------------------------------------------------------------------------- #
def dedupe_opset_imports(model) -> None:
    """Keep one opset_import per domain (the highest version)."""
    best = {}
    for o in model.opset_import:
        d = "" if o.domain == "ai.onnx" else o.domain
        best[d] = max(best.get(d, 0), o.version)
    del model.opset_import[:]
    for d, v in sorted(best.items()):
        op = model.opset_import.add()
        op.domain, op.version = d, v


def torch_exporter_name() -> str:
    import torch

    return f"torch.onnx {strip_local_version(torch.__version__)} (dynamo=False)"


def export_torch(
    module, args: tuple, *, input_names, output_names, dynamic_axes, opset: int, do_constant_folding: bool = True
):
    """Export with the legacy TorchScript exporter into memory; return a ModelProto."""
    import warnings

    import onnx
    import torch

    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            do_constant_folding=do_constant_folding,
        )
    return onnx.load_model_from_string(buf.getvalue())


def train_torch_classifier(
    model,
    x_train,
    y_train,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    extra_inputs=None,
    log_every: int = 10,
    seed: int = SEED,
):
    """Minimal seeded Adam training loop. ``extra_inputs`` are aligned tensors
    passed as additional positional args (e.g. an attention mask)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    extra_inputs = list(extra_inputs or [])
    n = len(y_train)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            logits = model(x_train[idx], *[e[idx] for e in extra_inputs])
            loss = loss_fn(logits, y_train[idx])
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        sched.step()
        if (ep + 1) % log_every == 0 or ep == epochs - 1:
            print(f"  epoch {ep + 1:3d}/{epochs} loss {tot / n:.4f}")
    model.eval()
    return model
