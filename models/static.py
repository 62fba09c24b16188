"""Run Paddle layers through Paddle Inference with oneDNN on the CPU.

On the CPU, eager Paddle's kernels run the backbone several times slower than the same layers
traced into a static graph and run by Paddle Inference with oneDNN (the eager and static rows
of the benchmark logs in logs/ have the figures). Tracing and loading are paid once per run,
so train.py and val.py use this for the backbone (and val.py for the whole model) on the CPU;
GPUs keep eager Paddle (cuDNN is already fast there). The tracing is models/export.py's, the
predictor models/deploy.py's.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import paddle

from models.deploy import InferenceSettings, PaddleInferenceModel
from models.model_file import first_line
from models.export import save_static_graph

LOGGER = logging.getLogger("padim")


class _Traced(paddle.nn.Layer):
    """Wraps ``function`` so that to_static converts this wrapper's forward, not the caller's
    layer (whose forward must stay eager)."""

    def __init__(self, layers: paddle.nn.LayerList, function):
        super().__init__()
        self.layers = layers
        self.function = function

    def forward(self, images):
        return self.function(images)


class StaticRunner:
    """``function(images)`` (built from the parameters of ``layers``) traced once into a static
    graph and run by a Paddle Inference predictor with oneDNN: ``runner(images [B, 3, H, W]
    float32)`` -> tuple of NumPy outputs. The graph files live in a temporary folder only while
    the predictor loads them."""

    def __init__(self, layers: Sequence[paddle.nn.Layer], function, image_size: Sequence[int],
                 threads: int | None = None):
        wrapper = _Traced(paddle.nn.LayerList(list(layers)), function)
        wrapper.eval()
        height, width = (int(v) for v in image_size)
        with tempfile.TemporaryDirectory(prefix="padim-static-") as folder:
            graph = save_static_graph(wrapper, height, width, Path(folder) / "graph")
            self.model = PaddleInferenceModel(graph, settings=InferenceSettings(enable_mkldnn=True, cpu_threads=threads),
                                              n_outputs=None, logger=LOGGER)

    def __call__(self, images) -> tuple:
        return self.model(images)


def static_runner_or_none(layers, function, image_size, what: str, enabled: bool | None = True):
    """A StaticRunner when ``enabled`` and Paddle runs on the CPU, else None (the caller runs
    eager). A graph that Paddle cannot trace or load falls back to eager with one warning."""
    if enabled is False or paddle.get_device() != "cpu":
        return None
    try:
        return StaticRunner(layers, function, image_size)
    except Exception as exc:  # noqa: BLE001 - any tracing/loading failure: eager still works
        LOGGER.warning(f"warning: running the {what} eagerly: Paddle Inference could not load it ({first_line(exc)})")
        return None
