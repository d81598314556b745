"""What the benches over the prepared example share: its ``--example`` argument and check, its calibration sample.

Imported by the bench scripts as ``import benchlib`` (a script's own folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from tuneqn.controller.config import DatasetSpec, ModelSpec, PreprocessSpec
from tuneqn.controller.farm.local import LocalAgent
from tuneqn.controller.prepare.dataset import prepare_data
from tuneqn.controller.prepare.modelio import prepare_model

if TYPE_CHECKING:
    import numpy as np

    from tuneqn.controller.prepare.modelio import PreparedModel

#: How EfficientNet-Lite was trained (examples/lite0/study.toml): short side 256, centre crop 224, (x − 127)/128.
LITE_PREPROCESS = PreprocessSpec(resize=256, crop=224, interpolation="bicubic", scale=1 / 128, offset=-127 / 128)


def parse_example(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path | None]:
    """Parse the command line with ``--example DIR`` (the prepared example, ``make example``) added; quiet
    logging. The arguments and the example folder (absolute), or None after one line on stderr when the example
    is not prepared (the bench then exits 2)."""
    ap.add_argument("--example", default="examples/lite0/work", help="the prepared example (make example)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(3)
    ex = Path(args.example).resolve()
    if not (ex / "model.onnx").is_file():
        print(f"example not prepared in {ex}: run `make example`", file=sys.stderr)
        return args, None
    return args, ex


def calibration_sample(ex: Path, tmp: Path, images: int = 20) -> tuple[PreparedModel, np.ndarray]:
    """The example's prepared model (in ``tmp``) and ``images`` calibration inputs, preprocessed as it was trained."""
    pm = prepare_model(ModelSpec(path=ex / "model.onnx", input_shape=[1, 3, 224, 224]), tmp / "models")
    spec = DatasetSpec(images=ex / "images", eval=1, calibration=images, analysis=1, preprocess=LITE_PREPROCESS)
    return pm, prepare_data(spec, pm.input_shape, tmp / "data").calibration.load()


def lab_agents(tmp: Path, sim_ms: float, names: str = "ab") -> list[LocalAgent]:
    """Started local agents of one device class ``lab`` (one per letter of ``names``), each predicting with
    ``sim_ms`` of simulated latency per sample."""
    agents = [
        LocalAgent(
            tmp / f"agent-{n}",
            device_name=n,
            extra_args=["--device-class", "lab", "--simulated-latency-ms", str(sim_ms)],
        )
        for n in names
    ]
    for a in agents:
        a.start()
    return agents
