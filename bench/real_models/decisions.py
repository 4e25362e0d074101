"""Task-level agreement with the original model's own decisions, for the real-model set (numpy only).

Each model's manifest entry names its ``decision`` kind; ``agreement(entry, ref, cand)`` compares the candidate's
decisions with the reference's over all evaluation samples (``ref``/``cand``: one list of outputs per sample):

- ``yolov8``: NudeNet's own decoding (boxes whose best class score >= 0.2, then NMS at score 0.25 / IoU 0.45 over
  all classes, as its ``_postprocess`` does with cv2.dnn.NMSBoxes), matched to the reference's detections by class
  and IoU >= 0.5: F1.
- ``mask``: DBNet's probability map binarized at RapidOCR's threshold (0.3): IoU of the text masks.
- ``top1``: the arg-max class, fraction equal.
- ``ctc``: greedy CTC decoding (arg-max per step, repeats collapsed, blank 0 dropped), as RapidOCR decodes: fraction
  of text lines decoded identically.
- ``threshold``: speech probability above 0.5 (silero-vad's default), fraction of chunks equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["agreement"]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [n, 4] against b [m, 4], boxes as (x, y, w, h)."""
    ax2, ay2, bx2, by2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return inter / np.maximum(union, 1e-9)


def _yolov8_detections(
    output: np.ndarray, score_min: float = 0.2, nms_score: float = 0.25, nms_iou: float = 0.45
) -> tuple[np.ndarray, np.ndarray]:
    rows = np.transpose(np.squeeze(output, 0))  # [anchors, 4 + classes]
    scores = rows[:, 4:].max(axis=1)
    keep = scores >= score_min
    rows, scores = rows[keep], scores[keep]
    classes = rows[:, 4:].argmax(axis=1)
    boxes = np.stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2, rows[:, 2], rows[:, 3]], axis=1)
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= nms_score]
    kept: list[int] = []
    for i in order:  # greedy NMS over all classes, as cv2.dnn.NMSBoxes
        if not kept or _iou(boxes[i : i + 1], boxes[kept]).max() <= nms_iou:
            kept.append(i)
    return boxes[kept], classes[kept]


def _f1(ref: list, cand: list) -> float:
    tp = fp = fn = 0
    for (rb, rc), (cb, cc) in zip(ref, cand):
        used: set[int] = set()
        for j in range(len(cb)):
            ious = _iou(cb[j : j + 1], rb)[0] if len(rb) else np.zeros(0)
            match = [k for k in np.argsort(-ious) if ious[k] >= 0.5 and rc[k] == cc[j] and k not in used]
            if match:
                used.add(match[0])
                tp += 1
            else:
                fp += 1
        fn += len(rb) - len(used)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _ctc(probs: np.ndarray) -> list[tuple[int, ...]]:
    best = probs.argmax(axis=-1)  # [lines, steps]
    out = []
    for row in best:
        seq = [int(c) for k, c in enumerate(row) if c != 0 and (k == 0 or c != row[k - 1])]
        out.append(tuple(seq))
    return out


def agreement(entry: dict, ref: list[list[np.ndarray]], cand: list[list[np.ndarray]]) -> float:
    kind = entry["decision"]
    if kind == "yolov8":
        return _f1([_yolov8_detections(r[0]) for r in ref], [_yolov8_detections(c[0]) for c in cand])
    if kind == "mask":
        t = entry.get("threshold", 0.3)
        inter = sum(float(((r[0] > t) & (c[0] > t)).sum()) for r, c in zip(ref, cand))
        union = sum(float(((r[0] > t) | (c[0] > t)).sum()) for r, c in zip(ref, cand))
        return 1.0 if union == 0 else inter / union
    if kind == "top1":
        return float(
            np.mean(np.concatenate([(r[0].argmax(-1) == c[0].argmax(-1)).reshape(-1) for r, c in zip(ref, cand)]))
        )
    if kind == "ctc":
        lines = [(a, b) for r, c in zip(ref, cand) for a, b in zip(_ctc(r[0]), _ctc(c[0]))]
        return float(np.mean([a == b for a, b in lines]))
    if kind == "threshold":
        t = entry.get("threshold", 0.5)
        return float(np.mean([np.array_equal(r[0] > t, c[0] > t) for r, c in zip(ref, cand)]))
    raise ValueError(f"unknown decision kind {kind!r}")


def eval_split(d: Path) -> Path:
    """The held-out split a model is judged on: prepare_more_eval.py's larger one when the model has it."""
    return d / "eval_more" if (d / "eval_more").is_dir() else d / "eval"
