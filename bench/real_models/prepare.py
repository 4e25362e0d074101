"""Build the real-model set: pretrained ONNX models that PyPI wheels ship, with inputs prepared by the packages'
own code, split into calibration and held-out evaluation feeds.

Runs in ``bench/.venv-real`` (made by ``setup.sh``: rapidocr-onnxruntime, nudenet, magika, silero-vad, scikit-image).
The inputs are real: photos bundled with scikit-image, text lines rendered with PIL's built-in font, real files
for the file-type classifier, speech synthesized with espeak-ng. Each package runs its own pipeline on them while
``onnxruntime.InferenceSession.run`` is recorded, so every feed is exactly what the package hands its model
(RapidOCR's resizing and normalization, its text crops for the classifier and the recognizer; NudeNet's
letterboxing; Magika's byte features). silero-vad's own wrapper needs torch, so its chunking (512 samples at
16 kHz with 64 samples of context, the recurrent state carried over) is replayed in numpy from its source.

Writes ``bench/out/real_models/<name>/{model.onnx, calib/, eval/}`` and ``bench/out/real_models/manifest.json``.

    bench/.venv-real/bin/python bench/real_models/prepare.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import wave
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out" / "real_models"
SEED = 0

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Invoice 2024-0117: total due 1,284.50 EUR",
    "Please keep this door closed at all times",
    "Model compression keeps the same answers",
    "Platform 9 departs at 14:35 for Edinburgh",
    "Call +44 20 7946 0958 before noon",
    "WARNING: high voltage inside",
    "Chapter 3. The weights of the network",
    "Fresh bread, coffee and cakes every morning",
    "Gate B12 boarding now",
    "Meeting moved to Thursday, room 401",
    "Serial no. AX-5521-KQ",
    "Do not feed the animals",
    "Open Monday to Friday 9am - 5pm",
    "Sum of squares: 3^2 + 4^2 = 25",
    "Total sparsity 50 percent, agreement 0.98",
]
SPEECH = [
    "Turn the lights off in the kitchen, please.",
    "The meeting starts in ten minutes.",
    "Compression must keep the decisions of the original model.",
    "Could you read the last sentence again?",
    "It is raining in the north and sunny in the south.",
    "Seven, eight, nine, ten.",
    "Please confirm the order before Friday.",
    "We measured the latency on two cores.",
]


# ------------------------------------------------------------------------------------------- recording
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class Recorder:
    """Records every (model path, feeds) that goes through ``onnxruntime.InferenceSession.run``."""

    def __init__(self):
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
        self._run = ort.InferenceSession.run
        recorder = self

        def run(session, output_names, input_feed, run_options=None):
            path = str(Path(getattr(session, "_model_path", "") or "").resolve())
            # Packages may hand plain lists (Magika does); onnxruntime converts them to the declared type.
            types = {i.name: _NP_TYPES.get(i.type) for i in session.get_inputs()}
            recorder.feeds[path].append({k: np.array(v, dtype=types.get(k)) for k, v in input_feed.items()})
            return recorder._run(session, output_names, input_feed, run_options)

        ort.InferenceSession.run = run

    def close(self) -> None:
        ort.InferenceSession.run = self._run


# ------------------------------------------------------------------------------------------- inputs
def _photos(folder: Path) -> list[Path]:
    """scikit-image's bundled photos, with flips and crops for variety, as RGB PNG files."""
    from PIL import Image
    from skimage import data

    names = [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "camera",
        "coins",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
        "colorwheel",
        "logo",
        "page",
        "text",
        "moon",
        "cat",
        "brick",
    ]
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        img = np.asarray(fn())
        if img.dtype != np.uint8:
            img = (255 * (img.astype(np.float64) - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3]
        h, w = img.shape[:2]
        for k, variant in enumerate([img, img[:, ::-1], img[h // 8 : h - h // 8, w // 8 : w - w // 8]]):
            p = folder / f"{name}_{k}.png"
            Image.fromarray(np.ascontiguousarray(variant)).save(p)
            out.append(p)
    return out


def _text_images(folder: Path) -> list[Path]:
    """Pages of text rendered with PIL's built-in font (800x600: RapidOCR scales the short side to 736): line count,
    sizes, positions, colours and upside-down pages vary (seeded)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(24):
        bg = tuple(int(v) for v in rng.integers(200, 256, 3))
        img = Image.new("RGB", (800, 600), bg)
        draw = ImageDraw.Draw(img)
        y = int(rng.integers(20, 60))
        for j in range(2 + i % 5):
            size = int(rng.integers(20, 36))
            line = SENTENCES[(3 * i + j) % len(SENTENCES)]
            fg = tuple(int(v) for v in rng.integers(0, 80, 3))
            draw.text((int(rng.integers(20, 120)), y), line, fill=fg, font=ImageFont.load_default(size=size))
            y += size + int(rng.integers(20, 60))
            if y > 560:
                break
        if i % 6 == 5:
            img = img.rotate(180)  # upside-down lines are what the orientation classifier is for
        p = folder / f"text_{i:02d}.png"
        img.save(p)
        out.append(p)
    return out


def _files_to_classify() -> list[Path]:
    """Real files of many types from the installed packages (sorted: the same set on every machine)."""
    site = Path(ort.__file__).resolve().parents[1]
    by_ext: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(site.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.stat().st_size > 64:
            by_ext[p.suffix.lower()].append(p)
    picked = []
    for ext in sorted(by_ext):
        picked.extend(by_ext[ext][:4])
    return picked[:160]


def _speech(folder: Path) -> list[np.ndarray]:
    """Synthesized sentences (espeak-ng) at 16 kHz mono, with silence and noise around them."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise SystemExit("espeak-ng and sox are needed for the speech inputs: apt-get install espeak-ng sox")
    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, text in enumerate(SPEECH):
        raw, wav16 = folder / f"s{i}.raw.wav", folder / f"s{i}.wav"
        voice = ["en", "en-us", "en-gb"][i % 3]
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(140 + 10 * (i % 4)), "-w", str(raw), text], check=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav16)], check=True)
        with wave.open(str(wav16)) as w:
            x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
        pad = lambda n: (rng.standard_normal(n) * 0.003).astype(np.float32)  # noqa: E731 - room noise
        clips.append(np.concatenate([pad(8000), x, pad(12000)]))
    return clips


# ------------------------------------------------------------------------------------------- models
def _package_file(module: str, *parts: str) -> Path:
    """A file inside an installed package, found without importing it (silero_vad imports torch)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations))).resolve().joinpath(*parts)


def record_rapidocr(rec: Recorder, images: list[Path]) -> dict[str, list[dict]]:
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    for p in images:
        engine(str(p))
    models = _package_file("rapidocr_onnxruntime", "models")
    return {
        "ocr_det_dbnet": rec.feeds[str((models / "ch_PP-OCRv4_det_infer.onnx").resolve())],
        "ocr_cls_mobilenetv3": rec.feeds[str((models / "ch_ppocr_mobile_v2.0_cls_infer.onnx").resolve())],
        "ocr_rec_svtr": rec.feeds[str((models / "ch_PP-OCRv4_rec_infer.onnx").resolve())],
    }


def record_nudenet(rec: Recorder, images: list[Path]) -> list[dict]:
    from nudenet import NudeDetector

    det = NudeDetector()
    for p in images:
        det.detect(str(p))
    return rec.feeds[str(_package_file("nudenet", "320n.onnx"))]


def record_magika(rec: Recorder, files: list[Path]) -> tuple[Path, list[dict]]:
    from magika import Magika

    m = Magika()
    for p in files:
        m.identify_path(p)
    path = next(Path(k) for k in rec.feeds if k.endswith("model.onnx") and "magika" in k)
    return path, rec.feeds[str(path)]


def silero_feeds(model: Path, clips: list[np.ndarray]) -> list[dict]:
    """silero-vad's OnnxWrapper.__call__ replayed in numpy: 512-sample chunks at 16 kHz, 64 samples of context,
    the state the model returns fed back in."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = []
    for x in clips:
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros((1, 64), np.float32)
        for start in range(0, len(x) - 511, 512):
            chunk = np.concatenate([context, x[None, start : start + 512]], axis=1).astype(np.float32)
            feed = {"input": chunk, "state": state, "sr": np.array(16000, dtype=np.int64)}
            _, state = sess.run(None, feed)
            feeds.append(feed)
            context = chunk[:, -64:]
    return feeds


def _save(name: str, src: Path, feeds: list[dict], meta: dict, n_calib: int, n_eval: int) -> dict:
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    (d / "calib").mkdir(parents=True)
    (d / "eval").mkdir()
    shutil.copyfile(src, d / "model.onnx")
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(feeds))  # calibration and evaluation drawn from the same inputs, disjoint
    calib, ev = order[:n_calib], order[n_calib : n_calib + n_eval]
    for split, idx in (("calib", calib), ("eval", ev)):
        for i, k in enumerate(sorted(int(j) for j in idx)):
            np.savez(d / split / f"{i:04d}.npz", **feeds[k])
    entry = {
        "name": name,
        "source": str(src.relative_to(src.parents[2])),
        "n_calib": len(calib),
        "n_eval": len(ev),
        **meta,
    }
    print(f"{name}: {len(feeds)} feeds recorded -> {len(calib)} calib, {len(ev)} eval", flush=True)
    return entry


def main() -> None:
    from importlib import metadata

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="real_models_"))
    photos, texts = _photos(work / "photos"), _text_images(work / "text")
    files, clips = _files_to_classify(), _speech(work / "speech")
    rec = Recorder()
    try:
        ocr = record_rapidocr(rec, texts + [p for p in photos if p.stem.startswith(("text", "page"))])
        nude = record_nudenet(rec, photos)
        magika_path, magika_feeds = record_magika(rec, files)
    finally:
        rec.close()
    vad_model = _package_file("silero_vad", "data", "silero_vad.onnx")
    packages = ("rapidocr_onnxruntime", "nudenet", "magika", "silero_vad")
    versions = {m: metadata.version(m.replace("_", "-")) for m in packages}
    ocr_dir = _package_file("rapidocr_onnxruntime", "models")
    entries = [
        _save(
            "detector_yolov8n_nudenet",
            _package_file("nudenet", "320n.onnx"),
            nude,
            {
                "task": "detection",
                "decision": "yolov8",
                "score_threshold": 0.2,
                "nms_iou": 0.45,
                "package": f"nudenet {versions['nudenet']}",
            },
            24,
            24,
        ),
        _save(
            "ocr_det_dbnet",
            ocr_dir / "ch_PP-OCRv4_det_infer.onnx",
            ocr["ocr_det_dbnet"],
            {
                "task": "text detection",
                "decision": "mask",
                "threshold": 0.3,
                "package": f"rapidocr-onnxruntime {versions['rapidocr_onnxruntime']}",
            },
            16,
            16,
        ),
        _save(
            "ocr_cls_mobilenetv3",
            ocr_dir / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
            ocr["ocr_cls_mobilenetv3"],
            {
                "task": "text orientation",
                "decision": "top1",
                "package": f"rapidocr-onnxruntime {versions['rapidocr_onnxruntime']}",
            },
            16,
            24,
        ),
        _save(
            "ocr_rec_svtr",
            ocr_dir / "ch_PP-OCRv4_rec_infer.onnx",
            ocr["ocr_rec_svtr"],
            {
                "task": "text recognition (CTC, 6625 characters)",
                "decision": "ctc",
                "package": f"rapidocr-onnxruntime {versions['rapidocr_onnxruntime']}",
            },
            16,
            24,
        ),
        _save(
            "filetype_magika",
            magika_path,
            magika_feeds,
            {"task": "file type", "decision": "top1", "package": f"magika {versions['magika']}"},
            64,
            96,
        ),
        _save(
            "vad_silero",
            vad_model,
            silero_feeds(vad_model, clips),
            {
                "task": "voice activity (If + LSTM)",
                "decision": "threshold",
                "threshold": 0.5,
                "package": f"silero-vad {versions['silero_vad']}",
            },
            64,
            256,
        ),
    ]
    (OUT / "manifest.json").write_text(json.dumps({"models": entries, "python": sys.version.split()[0]}, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
