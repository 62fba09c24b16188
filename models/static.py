"""Run a Paddle layer through Paddle Inference with oneDNN on the CPU.

Eager Paddle's CPU kernels run ResNet18 to layer3 at ~19 img/s on 2 cores; the same layers as a
static graph under Paddle Inference with oneDNN run at ~110 img/s. Tracing and loading cost
about half a second, so train.py and val.py use this for the backbone (and val.py for the
whole model) on the CPU; GPUs keep eager Paddle (cuDNN is already fast there).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import paddle

LOGGER = logging.getLogger("padim")


# Paddle 3.3.1 logs this through glog (stderr, C++) while tracing any batch-norm layer; it is not
# about our graph and says nothing a user can act on.
KNOWN_GLOG_WARNING = "Paddle static graph(PIR) not support input out tensor"


@contextlib.contextmanager
def without_known_glog_warning():
    """Capture file descriptor 2 (glog writes there, not to sys.stderr) and pass on every line
    but KNOWN_GLOG_WARNING."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if KNOWN_GLOG_WARNING not in line:
                    sys.stderr.write(line)
            sys.stderr.flush()


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
    graph and run by a Paddle Inference predictor: ``runner(images [B, C, H, W] float32)`` ->
    list of NumPy outputs. The graph files live in a temporary folder only while the predictor
    loads them."""

    def __init__(self, layers: Sequence[paddle.nn.Layer], function, input_shape: Sequence[int],
                 threads: int | None = None):
        from paddle import inference

        from models.padim import available_cpus

        wrapper = _Traced(paddle.nn.LayerList(list(layers)), function)
        wrapper.eval()
        spec = [paddle.static.InputSpec([-1, *[int(v) for v in input_shape]], "float32", name="image")]
        with tempfile.TemporaryDirectory(prefix="padim-static-") as folder:
            prefix = Path(folder) / "graph"
            with without_known_glog_warning():
                paddle.jit.save(paddle.jit.to_static(wrapper, input_spec=spec, full_graph=True), str(prefix))
            graph = next(prefix.parent.glob("graph.json"), None) or next(prefix.parent.glob("graph.pdmodel"))
            config = inference.Config(str(graph), str(prefix.parent / "graph.pdiparams"))
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(int(threads or available_cpus()))
            config.enable_mkldnn()
            config.switch_ir_optim(True)
            config.switch_use_feed_fetch_ops(False)
            config.disable_glog_info()
            self.predictor = inference.create_predictor(config)
        self._input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self._outputs = [self.predictor.get_output_handle(name) for name in self.predictor.get_output_names()]

    def __call__(self, images: np.ndarray) -> list:
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._input.reshape(list(images.shape))
        self._input.copy_from_cpu(images)
        self.predictor.run()
        return [output.copy_to_cpu() for output in self._outputs]


def static_runner_or_none(layers, function, input_shape, what: str, enabled: bool | None = True):
    """A StaticRunner when ``enabled`` and Paddle runs on the CPU, else None (the caller runs
    eager). A graph that Paddle cannot trace or load falls back to eager with one warning."""
    if enabled is False or paddle.get_device() != "cpu":
        return None
    try:
        return StaticRunner(layers, function, input_shape)
    except Exception as exc:  # noqa: BLE001 - any tracing/loading failure: eager still works
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        LOGGER.warning(f"warning: running the {what} eagerly: Paddle Inference could not load it ({first})")
        return None
