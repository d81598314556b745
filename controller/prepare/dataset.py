"""Evaluation data: images or tensors, preprocessing, labels, seeded disjoint samples.

The dataset is preprocessed once into float32 arrays (``<out>/data/<split>.npy``),
which is also the blob that agents receive. Samples are drawn with a seeded
permutation: the calibration sample and the evaluation sample never overlap; the
analysis sample is taken from the calibration sample (it only ranks layers).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tuneqn.controller.common.errors import UserError
from tuneqn.controller.common.files import atomic_write_bytes, atomic_write_text, file_sha256
from tuneqn.controller.common.versions import cpu_cores, tool_versions
from tuneqn.controller.config import PREPROCESS_PRESETS, PRESET_KEYS, DatasetSpec, PreprocessSpec

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
    #: Images of the folder that could not be read and were left out: ``{"file", "reason"}``.
    skipped: list[dict[str, str]] = field(default_factory=list)


class UnreadableImage(UserError):
    """An image file that cannot be decoded (``reason`` says why)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"dataset.images: cannot read image {path} ({reason})")
        self.path = path
        self.reason = reason


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


def _geometry(pp: PreprocessSpec, hw: tuple[int, int]) -> tuple[int | None, tuple[int, int] | None]:
    """(short side to resize to, centre crop (w, h)) of a resolved spec for a model input of ``hw``."""
    h, w = hw
    resize: int | None
    crop: tuple[int, int] | None
    if pp.crop_fraction is not None:
        crop = (pp.crop, pp.crop) if pp.crop is not None else (w, h)
        resize = pp.resize if pp.resize is not None else max(1, round(min(crop) / pp.crop_fraction))
    else:
        resize, crop = pp.resize, (pp.crop, pp.crop) if pp.crop is not None else None
    if resize is not None and crop is not None and min(crop) > resize:
        raise UserError(
            f"dataset.preprocess.resize: the short side ({resize}) is smaller than the centre crop "
            f"({crop[0]}×{crop[1]})"
        )
    return resize, crop


def _normalization(pp: PreprocessSpec) -> tuple[float, float]:
    """(scale, offset) of a resolved spec: default scale 1/255, or 1 (pixel units) with mean/std."""
    scale = pp.scale if pp.scale is not None else (1.0 if pp.mean is not None else 1.0 / 255.0)
    return scale, pp.offset or 0.0


def preprocess_image(path: Path, pp: PreprocessSpec, hw: tuple[int, int]) -> np.ndarray:
    """One image → float32 array in the model's layout (C,H,W) or (H,W,C).

    RGB (or BGR) pixels 0–255 → resize/centre crop (:func:`_geometry`) → ``x · scale + offset`` →
    ``(x − mean) / std`` when mean/std are given.
    """
    pp = pp.resolved()
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image format Pillow can read") from None
    # Pillow reports damaged files as OSError (truncated), SyntaxError (broken PNG chunks),
    # ValueError or DecompressionBombError, depending on the format.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        why = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        raise UnreadableImage(path, why) from None
    assert pp.interpolation is not None  # resolved() fills in the default interpolation
    resample = _RESAMPLE[pp.interpolation]
    h, w = hw
    resize, crop = _geometry(pp, hw)
    if resize is not None:
        scale = resize / min(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), resample)
    elif crop is None:
        img = img.resize((w, h), resample)
    if crop is not None:
        cw, ch = crop
        left = int(round((img.size[0] - cw) / 2.0))
        top = int(round((img.size[1] - ch) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    if img.size != (w, h):
        img = img.resize((w, h), resample)
    arr: np.ndarray = np.asarray(img, dtype=np.float32)
    if pp.color == "BGR":
        arr = arr[..., ::-1]
    scale, offset = _normalization(pp)
    arr = arr * np.float32(scale) + np.float32(offset)
    if pp.mean is not None and pp.std is not None:
        arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    if pp.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _num(v: float) -> str:
    return f"{v:.6g}"


def _formula(pp: PreprocessSpec) -> str:
    """``x/255``, ``(x − 127)/128``, ``(x/255 − [0.485, 0.456, 0.406])/[0.229, 0.224, 0.225]`` …"""
    scale, offset = _normalization(pp)
    if offset == 0:
        base = "x" if scale == 1 else f"x/{_num(1 / scale)}" if abs(1 / scale) >= 1 else f"{_num(scale)}·x"
    else:
        shift, div = -offset / scale, 1 / scale
        sign = "−" if shift >= 0 else "+"
        base = f"(x {sign} {_num(abs(shift))})" + ("" if div == 1 else f"/{_num(div)}")
    if pp.mean is None or pp.std is None:
        lo, hi = sorted((offset, 255 * scale + offset))
        return f"{base} ∈ [{lo:.4g}, {hi:.4g}]"

    def vec(v: list[float]) -> str:
        return _num(v[0]) if len(v) == 1 else "[" + ", ".join(_num(x) for x in v) + "]"

    inner = base[1:-1] if base.startswith("(") and base.endswith(")") else base
    return f"({inner} − {vec(pp.mean)})/{vec(pp.std)}"


def _preset_label(pp: PreprocessSpec) -> str:
    """The preset's name (``+ your scale`` for keys that change it), ``unit (default)`` or ``custom``."""
    if pp.preset is None:
        given = [k for k in (*PRESET_KEYS, "resize", "crop") if getattr(pp, k) is not None]
        return "custom" if given else "unit (default)"
    preset = PREPROCESS_PRESETS[pp.preset]
    changed = [
        k for k in (*PRESET_KEYS, "resize", "crop") if getattr(pp, k) is not None and getattr(pp, k) != preset.get(k)
    ]
    return pp.preset + (f" with your {', '.join(changed)}" if changed else "")


def describe_preprocess(spec: PreprocessSpec, hw: tuple[int, int] | None) -> str:
    """One line saying what the images go through, e.g.
    ``lite: RGB, short side → 256 (bicubic), centre crop 224, (x − 127)/128 ∈ [-0.992188, 1], NCHW``.

    ``hw``: the model input's (H, W); None when not known yet (the crop is then "the model's H×W").
    """
    pp = spec.resolved()
    parts: list[str] = [pp.color]
    if hw is None and pp.crop_fraction is not None and pp.crop is None:
        geo = f"short side → crop/{_num(pp.crop_fraction)} ({pp.interpolation}), centre crop to the model's H×W"
        if pp.resize is not None:
            geo = f"short side → {pp.resize} ({pp.interpolation}), centre crop to the model's H×W"
        parts.append(geo)
    else:
        size = f"{hw[0]}×{hw[1]}" if hw is not None else "the model's H×W"
        resize, crop = _geometry(pp, hw) if hw is not None else (pp.resize, (pp.crop, pp.crop) if pp.crop else None)
        if resize is not None:
            parts.append(f"short side → {resize} ({pp.interpolation})")
        if crop is not None:
            cw, ch = crop
            parts.append(f"centre crop {cw}" if cw == ch else f"centre crop {ch}×{cw}")
        if resize is None and crop is None:
            parts.append(f"resized to {size} ({pp.interpolation}, aspect ratio not kept)")
        elif (crop is None or hw is not None) and (hw is None or crop != (hw[1], hw[0])):
            parts.append(f"resized to {size}")
    parts += [_formula(pp), pp.layout]
    return f"{_preset_label(spec)}: " + ", ".join(parts)


def preprocess_settings(spec: PreprocessSpec, hw: tuple[int, int] | None) -> dict[str, Any]:
    """The resolved settings as a dict (the preset's values filled in; ``resize``/``crop`` as used for ``hw``)."""
    pp = spec.resolved()
    out = pp.model_dump(mode="json")
    out["scale"], out["offset"] = _normalization(pp)
    if hw is not None:
        resize, crop = _geometry(pp, hw)
        out["resize"] = resize
        out["crop"] = None if crop is None else crop[0] if crop[0] == crop[1] else [crop[1], crop[0]]
    return out


def model_hw(input_shape: Sequence[int | str], pp: PreprocessSpec) -> tuple[int, int] | None:
    """The (H, W) images are prepared for, from a model's input shape in ``pp``'s layout; None if not 4-D and fixed."""
    if len(input_shape) != 4:
        return None
    h, w = (input_shape[2], input_shape[3]) if pp.layout == "NCHW" else (input_shape[1], input_shape[2])
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None


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


def save_split(folder: Path, name: str, arr: np.ndarray) -> tuple[Path, str]:
    """Write ``arr`` to ``folder/name.npy`` atomically; returns (path, sha256 of the bytes)."""
    path = folder / f"{name}.npy"
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return path, hashlib.sha256(data).hexdigest()


def data_key(spec: DatasetSpec, input_shape: list[int | str]) -> str:
    """What the prepared samples depend on: the settings, the input files' contents and the tool versions."""
    settings = spec.model_dump(mode="json")
    # The resolved preprocessing decides the pixels; a study without preset or crop_fraction keeps its old key.
    pp = spec.preprocess.resolved().model_dump(mode="json", exclude={"preset"})
    if pp["crop_fraction"] is None:
        del pp["crop_fraction"]
    settings["preprocess"] = pp
    parts: list[Any] = [settings, input_shape, tool_versions()]
    if spec.images is not None:
        files = _list_images(spec.images)
        parts.append([[p.relative_to(spec.images).as_posix(), file_sha256(p)] for p in files])
    if spec.tensors is not None and spec.tensors.is_file():
        parts.append(file_sha256(spec.tensors))
    if spec.labels.csv is not None and spec.labels.csv.is_file():
        parts.append(file_sha256(spec.labels.csv))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _readable_images(
    files: list[Path], root: Path, order: np.ndarray, need: int, pp: PreprocessSpec, hw: tuple[int, int]
) -> tuple[list[int], dict[int, np.ndarray], list[dict[str, str]]]:
    """The first ``need`` readable images in ``order`` (indices, arrays) and the unreadable ones met on the way.

    Decoded on a thread per core (Pillow's decode and resize release the GIL: 120 Lite1 photos in 0.4 s instead
    of 0.75 s on 2 cores, before any calibration can start), as many at a time as are still needed, so the images
    read and skipped are those of a walk in ``order``."""
    chosen: list[int] = []
    arrays: dict[int, np.ndarray] = {}
    skipped: list[dict[str, str]] = []

    def read(i: int) -> np.ndarray | UnreadableImage:
        try:
            return preprocess_image(files[i], pp, hw)
        except UnreadableImage as exc:
            return exc

    walk = (int(v) for v in order)
    with ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="images") as pool:
        while len(chosen) < need and (batch := list(itertools.islice(walk, need - len(chosen)))):
            for i, got in zip(batch, pool.map(read, batch), strict=True):
                if isinstance(got, UnreadableImage):
                    log.warning("dataset.images: skipping unreadable image %s (%s)", files[i], got.reason)
                    skipped.append({"file": files[i].relative_to(root).as_posix(), "reason": got.reason})
                    continue
                arrays[i] = got
                chosen.append(i)
    if not chosen:
        first = skipped[0]
        raise UserError(
            f"dataset.images: none of the {len(files)} images in {root} can be read "
            f"({first['file']}: {first['reason']})"
        )
    return chosen, arrays, skipped


def prepare_data(spec: DatasetSpec, input_shape: list[int | str], out_dir: Path) -> PreparedData:
    """Draw the seeded samples, preprocess them and save them under ``out_dir``.

    Stored samples are reused while :func:`data_key` (settings, input file contents, tool
    versions) is unchanged. Unreadable images are skipped with a warning and listed in
    :attr:`PreparedData.skipped`; only a folder where none can be read is refused.
    """
    manifest = out_dir / "manifest.json"
    key = data_key(spec, input_shape)
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            m = {}
        if m.get("key") == key and all((out_dir / f"{s}.npy").is_file() for s in ("eval", "calibration", "analysis")):
            splits = {
                s: Split(
                    s, out_dir / f"{s}.npy", m["splits"][s]["sha256"], m["splits"][s]["items"], m["splits"][s]["labels"]
                )
                for s in ("eval", "calibration", "analysis")
            }
            if all(file_sha256(sp.path) == sp.sha256 for sp in splits.values()):
                return PreparedData(
                    splits["eval"], splits["calibration"], splits["analysis"], m["has_labels"], m.get("skipped", [])
                )

    rng = np.random.default_rng(spec.seed)
    labels_all: list[int] | None
    skipped: list[dict[str, str]] = []
    if spec.images is not None:
        files = _list_images(spec.images)
        labels_all = _labels_for(files, spec.images, spec)
        items_all = [p.relative_to(spec.images).as_posix() for p in files]
        n = len(files)
        calib_n, eval_n = _split_sizes(n, spec)
        order = rng.permutation(n)
        hw = _image_hw(input_shape, spec.preprocess.layout)
        readable, arrays, skipped = _readable_images(files, spec.images, order, calib_n + eval_n, spec.preprocess, hw)
        if len(readable) < calib_n + eval_n:  # unreadable images left too few: split what can be read
            n = len(readable)
            calib_n, eval_n = _split_sizes(n, spec)
        order = np.asarray(readable, dtype=np.int64)

        def load(idx: np.ndarray) -> np.ndarray:
            return np.stack([arrays[int(i)] for i in idx])
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
    splits = {}
    for name, idx in (("calibration", calib_idx), ("eval", eval_idx), ("analysis", analysis_idx)):
        arr = load(idx)
        path, sha = save_split(out_dir, name, arr)
        labels = [labels_all[i] for i in idx] if labels_all is not None else None
        splits[name] = Split(name, path, sha, [items_all[i] for i in idx], labels)
        meta[name] = {"sha256": sha, "items": splits[name].items, "labels": labels}
    has_labels = labels_all is not None
    atomic_write_text(manifest, json.dumps({"key": key, "splits": meta, "has_labels": has_labels, "skipped": skipped}))
    return PreparedData(splits["eval"], splits["calibration"], splits["analysis"], has_labels, skipped)
