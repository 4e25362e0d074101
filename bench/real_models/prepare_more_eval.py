"""A larger held-out split for the image models of the real-model set: ``<name>/eval_more/``.

``prepare.py``'s eval splits hold 14-24 feeds for the detector and the OCR models, so one changed decision moves
their agreement by 4-7 points and a 1-point budget means "no decision may change". This adds inputs the main
set never saw, made the same way (each package's own pipeline, recorded at ``InferenceSession.run``):
- photos: scikit-image's bundled photos under other transforms (quarter turns, quadrant crops, a 0.6x
  downscale, brightness and contrast changes, grayscale);
- text pages: rendered like prepare.py's but from another seed (other sentences' order, sizes, colours and
  positions; every sixth upside down).
The calibration and eval splits of ``prepare.py`` are left as they are (the recorded results keep meaning).

    bench/.venv-real/bin/python bench/real_models/prepare_more_eval.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import prepare

SEED = 1


def _photo_variants(folder: Path) -> list[Path]:
    from PIL import Image, ImageEnhance

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in prepare._photos(folder / "base"):
        if not src.stem.endswith("_0"):  # one per bundled photo: prepare.py's flips/crops are its own
            continue
        img = Image.open(src).convert("RGB")
        w, h = img.size
        variants = [
            img.rotate(90, expand=True),
            img.rotate(270, expand=True),
            img.crop((0, 0, w * 2 // 3, h * 2 // 3)),
            img.crop((w // 3, h // 3, w, h)),
            img.resize((max(1, int(w * 0.6)), max(1, int(h * 0.6)))),
            ImageEnhance.Brightness(img).enhance(0.6),
            ImageEnhance.Contrast(img).enhance(1.5),
            img.convert("L").convert("RGB"),
        ]
        for k, v in enumerate(variants):
            p = folder / f"{src.stem[:-2]}_more{k}.png"
            v.save(p)
            out.append(p)
    return out


def _text_pages(folder: Path, n: int = 48) -> list[Path]:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(190, 256, 3))
        img = Image.new("RGB", (800, 600), bg)
        draw = ImageDraw.Draw(img)
        y = int(rng.integers(20, 60))
        for _ in range(2 + i % 5):
            size = int(rng.integers(18, 38))
            line = prepare.SENTENCES[int(rng.integers(0, len(prepare.SENTENCES)))]
            fg = tuple(int(v) for v in rng.integers(0, 90, 3))
            draw.text((int(rng.integers(10, 140)), y), line, fill=fg, font=ImageFont.load_default(size=size))
            y += size + int(rng.integers(18, 64))
            if y > 560:
                break
        if i % 6 == 5:
            img = img.rotate(180)
        p = folder / f"more_{i:02d}.png"
        img.save(p)
        out.append(p)
    return out


def _write(name: str, feeds: list[dict]) -> int:
    d = prepare.OUT / name / "eval_more"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for i, f in enumerate(feeds):
        np.savez(d / f"{i:04d}.npz", **f)
    print(f"{name}: {len(feeds)} more eval feeds", flush=True)
    return len(feeds)


def main() -> None:
    manifest_path = prepare.OUT / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    work = Path(tempfile.mkdtemp(prefix="real_models_more_"))
    photos, texts = _photo_variants(work / "photos"), _text_pages(work / "text")
    rec = prepare.Recorder()
    try:
        ocr = prepare.record_rapidocr(rec, texts)
        nude = prepare.record_nudenet(rec, photos)
    finally:
        rec.close()
    counts = {"detector_yolov8n_nudenet": _write("detector_yolov8n_nudenet", nude)}
    for name, feeds in ocr.items():
        counts[name] = _write(name, feeds)
    for e in manifest["models"]:
        if e["name"] in counts:
            e["n_eval_more"] = counts[e["name"]]
    manifest_path.write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
