"""Evaluation data: images or tensors, preprocessing, labels, seeded disjoint samples.

The dataset is preprocessed once into float32 arrays (``<out>/data/<split>.npy``),
which is also the blob that agents receive. Samples are drawn with a seeded
permutation: the calibration sample and the evaluation sample never overlap; the
analysis sample is taken from the calibration sample (it only ranks layers).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tuneqn.controller.config import DatasetSpec, PreprocessSpec
from tuneqn.controller.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass
class Split:
    """One sample of the dataset, preprocessed."""

    name: str
    path: Path
    sha256: str
    items: list[str]
    labels: list[int] | None  # -1 where an item has no label

    @property
    def size(self) -> int:
        """Number of samples."""
        return len(self.items)

    def load(self) -> np.ndarray:
        """The preprocessed float32 array (N, ...)."""
        return np.load(self.path, allow_pickle=False)


@dataclass
class PreparedData:
    """The study's samples."""

    eval: Split
    calibration: Split
    analysis: Split
    has_labels: bool


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"dataset.images: folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"dataset.images: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def _labels_for(files: list[Path], root: Path, spec: DatasetSpec) -> list[int] | None:
    lab = spec.labels
    if not lab.any:
        return None
    rel = [p.relative_to(root).as_posix() for p in files]
    if lab.csv is not None:
        if not lab.csv.is_file():
            raise UserError(f"dataset.labels.csv: file not found: {lab.csv}")
        table: dict[str, int] = {}
        with lab.csv.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
                raise UserError(f"dataset.labels.csv: {lab.csv} needs a header 'file,label'")
            for i, row in enumerate(reader, start=2):
                try:
                    table[row["file"]] = int(row["label"])
                except (TypeError, ValueError):
                    raise UserError(f"dataset.labels.csv: {lab.csv} line {i}: label must be an int") from None
        out = [table.get(r, table.get(Path(r).name, -1)) for r in rel]
    elif lab.subfolders:
        classes = sorted({Path(r).parts[0] for r in rel if len(Path(r).parts) > 1})
        if not classes:
            raise UserError("dataset.labels.subfolders: images are not in class subfolders")
        index = {c: int(c) if c.isdigit() else i for i, c in enumerate(classes)}
        out = [index[Path(r).parts[0]] if len(Path(r).parts) > 1 else -1 for r in rel]
    else:
        try:
            rx = re.compile(lab.regex or "")
        except re.error as exc:
            raise UserError(f"dataset.labels.regex: invalid regex ({exc})") from None
        if rx.groups < 1:
            raise UserError("dataset.labels.regex: needs one capture group for the label")
        out = []
        for r in rel:
            m = rx.search(Path(r).name)
            out.append(int(m.group(1)) if m and m.group(1).isdigit() else -1)
    if all(v < 0 for v in out):
        raise UserError("dataset.labels: no image got a label; check the label source")
    return out


def preprocess_image(path: Path, pp: PreprocessSpec, hw: tuple[int, int]) -> np.ndarray:
    """One image → float32 array in the model's layout (C,H,W) or (H,W,C)."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"dataset.images: cannot read image {path} ({exc.__class__.__name__})") from None
    resample = _RESAMPLE[pp.interpolation]
    h, w = hw
    if pp.resize is not None:
        scale = pp.resize / min(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), resample)
    elif pp.crop is None:
        img = img.resize((w, h), resample)
    if pp.crop is not None:
        cw = ch = pp.crop
        left = int(round((img.size[0] - cw) / 2.0))
        top = int(round((img.size[1] - ch) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    if img.size != (w, h):
        img = img.resize((w, h), resample)
    arr = np.asarray(img, dtype=np.float32)
    if pp.color == "BGR":
        arr = arr[..., ::-1]
    if pp.mean is not None and pp.std is not None:
        arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    else:
        scale = pp.scale if pp.scale is not None else 1.0 / 255.0
        arr = arr * np.float32(scale) + np.float32(pp.offset or 0.0)
    if pp.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _image_hw(input_shape: list[int | str], layout: str) -> tuple[int, int]:
    if len(input_shape) != 4:
        raise UserError(f"dataset.images: model input has rank {len(input_shape)}, images need a 4-D input")
    h, w = (input_shape[2], input_shape[3]) if layout == "NCHW" else (input_shape[1], input_shape[2])
    if not isinstance(h, int) or not isinstance(w, int):
        raise UserError("dataset.images: model input H/W are dynamic; set models[].input_shape")
    return h, w


def _split_sizes(n: int, spec: DatasetSpec) -> tuple[int, int]:
    if n < 2:
        raise UserError(f"dataset: needs at least 2 samples, found {n}")
    calib = min(spec.calibration, max(1, n // 2)) if n < spec.calibration + 1 else spec.calibration
    ev = min(spec.eval, n - calib)
    return calib, ev


def _save(folder: Path, name: str, arr: np.ndarray) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npy"
    tmp = folder / f".{name}.npy.part"
    with tmp.open("wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(spec: DatasetSpec, input_shape: list[int | str], out_dir: Path) -> PreparedData:
    """Draw the seeded samples, preprocess them and save them under ``out_dir``."""
    manifest = out_dir / "manifest.json"
    key = hashlib.sha256(
        json.dumps([spec.model_dump(mode="json"), input_shape], sort_keys=True).encode()
    ).hexdigest()
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            m = {}
        if m.get("key") == key and all((out_dir / f"{s}.npy").is_file() for s in ("eval", "calibration", "analysis")):
            splits = {
                s: Split(s, out_dir / f"{s}.npy", m["splits"][s]["sha256"], m["splits"][s]["items"], m["splits"][s]["labels"])
                for s in ("eval", "calibration", "analysis")
            }
            if all(hashlib.sha256(sp.path.read_bytes()).hexdigest() == sp.sha256 for sp in splits.values()):
                return PreparedData(splits["eval"], splits["calibration"], splits["analysis"], m["has_labels"])

    rng = np.random.default_rng(spec.seed)
    labels_all: list[int] | None
    if spec.images is not None:
        files = _list_images(spec.images)
        labels_all = _labels_for(files, spec.images, spec)
        items_all = [p.relative_to(spec.images).as_posix() for p in files]
        n = len(files)
        calib_n, eval_n = _split_sizes(n, spec)
        order = rng.permutation(n)
        hw = _image_hw(input_shape, spec.preprocess.layout)

        def load(idx: np.ndarray) -> np.ndarray:
            return np.stack([preprocess_image(files[i], spec.preprocess, hw) for i in idx])
    else:
        tensors = spec.tensors
        if tensors is None or not tensors.is_file():
            raise UserError(f"dataset.tensors: file not found: {tensors}")
        try:
            loaded = np.load(tensors, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"dataset.tensors: {tensors} is not a .npy/.npz file ({exc.__class__.__name__})") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            keys = list(loaded.keys())
            if not keys:
                raise UserError(f"dataset.tensors: {tensors} holds no arrays")
            data = loaded["inputs"] if "inputs" in keys else loaded[keys[0]]
            labels_all = [int(v) for v in loaded["labels"]] if "labels" in keys else None
        else:
            data, labels_all = loaded, None
        data = np.asarray(data, dtype=np.float32)
        n = data.shape[0] if data.ndim else 0
        items_all = [f"#{i}" for i in range(n)]
        calib_n, eval_n = _split_sizes(n, spec)
        order = rng.permutation(n)

        def load(idx: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(data[idx])

    calib_idx = np.sort(order[:calib_n])
    eval_idx = np.sort(order[calib_n : calib_n + eval_n])
    analysis_idx = calib_idx[: min(spec.analysis, calib_n)]
    if eval_n < spec.eval or calib_n < spec.calibration:
        log.warning("dataset has %d samples: using %d for calibration and %d for evaluation", n, calib_n, eval_n)
    meta: dict[str, dict] = {}
    splits: dict[str, Split] = {}
    for name, idx in (("calibration", calib_idx), ("eval", eval_idx), ("analysis", analysis_idx)):
        arr = load(idx)
        path, sha = _save(out_dir, name, arr)
        labels = [labels_all[i] for i in idx] if labels_all is not None else None
        splits[name] = Split(name, path, sha, [items_all[i] for i in idx], labels)
        meta[name] = {"sha256": sha, "items": splits[name].items, "labels": labels}
    has_labels = labels_all is not None
    manifest.write_text(json.dumps({"key": key, "splits": meta, "has_labels": has_labels}))
    return PreparedData(splits["eval"], splits["calibration"], splits["analysis"], has_labels)
