"""The AutoLog report of the original infer.py (auto_log 1.2.0), without auto_log.

``create_autolog(...)`` returns ``auto_log.AutoLogger`` when that package is importable (it is
not on PyPI), else ``AutoLogReport``, which has the same constructor arguments, the same
``times.start() / times.stamp() / times.end(stamp=True)`` timer and the same report: sections,
labels and line format ``[%Y/%m/%d %H:%M:%S] root INFO: ...``. Differences, on purpose:

- The report goes through a dedicated logger (``padim.autolog``, not the root logger), to stdout
  and, if ``save_path`` is given, to that file; ``report()`` returns instead of calling sys.exit.
- ``cpu_rss(MB)`` is the peak of the process's resident set size (psutil), sampled at every
  timer stamp and at report time, not a 0.2 s sampling subprocess. ``gpu_rss(MB)`` and
  ``gpu_util`` come from ``nvidia-smi`` when a GPU id is given and the tool exists, else None.
- The per-batch means skip the first ``warmup`` batches (infer.py passes 1 when there is more
  than one batch); ``total time spent(s)`` is the sum over all batches, warm-up included.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import time

import psutil

LOGGER_NAME = "padim.autolog"
_FORMAT = logging.Formatter("[%(asctime)s] root %(levelname)s: %(message)s", datefmt="%Y/%m/%d %H:%M:%S")
DEFAULT_TIME_KEYS = ("preprocess_time", "inference_time", "postprocess_time")


def auto_log_available() -> bool:
    return importlib.util.find_spec("auto_log") is not None


def report_logger(save_path=None) -> logging.Logger:
    """stdout (and optionally a file), never the root logger, which Paddle reconfigures."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(_FORMAT)
    logger.addHandler(stream)
    if save_path:
        directory = os.path.dirname(os.path.abspath(save_path))
        os.makedirs(directory, exist_ok=True)
        file_handler = logging.FileHandler(save_path, mode="w", encoding="utf-8")
        file_handler.setFormatter(_FORMAT)
        logger.addHandler(file_handler)
    return logger


class Times:
    """auto_log's timer: start, one stamp per stage boundary, end(stamp=True) per batch."""

    def __init__(self, keys=DEFAULT_TIME_KEYS, on_stamp=None):
        self.keys = list(keys)
        self.records: list[list[float]] = []
        self._stamps: list[float] | None = None
        self._on_stamp = on_stamp

    def start(self) -> None:
        self._stamps = [time.perf_counter()]
        if self._on_stamp:
            self._on_stamp()

    def stamp(self) -> None:
        if self._stamps is None:
            raise RuntimeError("Times.stamp() before Times.start()")
        self._stamps.append(time.perf_counter())
        if self._on_stamp:
            self._on_stamp()

    def end(self, stamp: bool = False) -> None:
        if stamp:
            self.stamp()
        if self._stamps is None:
            raise RuntimeError("Times.end() before Times.start()")
        intervals = [b - a for a, b in zip(self._stamps[:-1], self._stamps[1:])]
        if len(intervals) != len(self.keys):
            raise RuntimeError(f"{len(intervals)} timed stages for {len(self.keys)} time keys {self.keys}")
        self.records.append(intervals)
        self._stamps = None

    def means_ms(self, warmup: int = 0) -> list[float]:
        kept = self.records[warmup:] if len(self.records) > warmup else self.records
        if not kept:
            return [0.0] * len(self.keys)
        return [1000.0 * sum(r[k] for r in kept) / len(kept) for k in range(len(self.keys))]

    def total_s(self) -> float:
        return sum(sum(r) for r in self.records)


def _nvidia_smi(query: str, gpu_id) -> str | None:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    command = [tool, f"--query-gpu={query}", "--format=csv,noheader,nounits"]
    if gpu_id is not None:
        command.append(f"--id={gpu_id}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0].strip() if done.returncode == 0 and done.stdout.strip() else None


def os_version() -> str:
    try:
        release = platform.freedesktop_os_release()
        return f"{release.get('NAME', platform.system())} {release.get('VERSION_ID', '')}".strip()
    except OSError:
        return f"{platform.system()} {platform.release()}"


class AutoLogReport:
    """Drop-in for ``auto_log.AutoLogger`` (same keyword arguments, ``times`` and ``report()``)."""

    def __init__(self, model_name, model_precision, batch_size, data_shape, save_path=None,
                 inference_config=None, pids=None, process_name=None, gpu_ids=None,
                 time_keys=DEFAULT_TIME_KEYS, warmup=0, logger=None):
        self.model_name = model_name
        self.model_precision = model_precision
        self.batch_size = batch_size
        self.data_shape = data_shape
        self.save_path = save_path
        self.inference_config = inference_config
        self.process = psutil.Process(pids if isinstance(pids, int) else os.getpid())
        self.gpu_ids = gpu_ids
        self.warmup = int(warmup)
        self.peak_rss = 0
        self.times = Times(time_keys, on_stamp=self.sample_memory)
        self.logger = logger
        self.sample_memory()

    def sample_memory(self) -> None:
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def conf_info(self) -> dict:
        config = self.inference_config
        if config is None:
            return {}
        if isinstance(config, dict):
            return dict(config)
        return {"runtime_device": "gpu" if config.use_gpu() else "cpu",
                "ir_optim": config.ir_optim(),
                "enable_memory_optim": True,
                "enable_tensorrt": config.tensorrt_engine_enabled(),
                "enable_mkldnn": config.mkldnn_enabled(),
                "cpu_math_library_num_threads": config.cpu_math_library_num_threads()}

    def lines(self) -> list[str]:
        self.sample_memory()
        gpu = self.gpu_ids is not None
        paddle = importlib.import_module("paddle") if importlib.util.find_spec("paddle") else None
        with_cuda = paddle is not None and paddle.device.is_compiled_with_cuda()
        cuda = paddle.version.cuda() if with_cuda else None
        cudnn = paddle.version.cudnn() if with_cuda else None
        driver = _nvidia_smi("driver_version", self.gpu_ids) if gpu else None
        gpu_rss = gpu_util = None
        if gpu:
            memory = _nvidia_smi("memory.used", self.gpu_ids)
            utilisation = _nvidia_smi("utilization.gpu", self.gpu_ids)
            gpu_rss = float(memory) if memory else None
            gpu_util = float(utilisation) if utilisation else None
        means = self.times.means_ms(self.warmup)
        perf_times = ", ".join(f"{key}(ms): {round(value, 4)}" for key, value in zip(self.times.keys, means))
        out = ["",
               "---------------------- Env info ----------------------",
               f" OS_version: {os_version()}",
               f" CUDA_version: {cuda}",
               f" CUDNN_version: {cudnn}",
               f" drivier_version: {driver}",
               "---------------------- Paddle info ----------------------",
               f" paddle_version: {paddle.__version__ if paddle else None}",
               f" paddle_commit: {paddle.version.commit if paddle else None}",
               " log_api_version: 1.0",
               "----------------------- Conf info -----------------------"]
        out += [f" {key}: {value}" for key, value in self.conf_info().items()]
        out += ["----------------------- Model info ----------------------",
                f" model_name: {self.model_name}",
                f" precision: {self.model_precision}",
                "----------------------- Data info -----------------------",
                f" batch_size: {self.batch_size}",
                f" input_shape: {self.data_shape}",
                f" data_num: {len(self.times.records)}",
                "----------------------- Perf info -----------------------",
                f" cpu_rss(MB): {round(self.peak_rss / 2 ** 20, 4)}, gpu_rss(MB): {gpu_rss}, gpu_util: {gpu_util}%",
                f" total time spent(s): {round(self.times.total_s(), 4)}",
                f" {perf_times}"]
        return out

    def report(self) -> None:
        logger = self.logger or report_logger(self.save_path)
        for line in self.lines():
            logger.info(line)
        for handler in logger.handlers:
            handler.flush()


def create_autolog(**kwargs):
    """``auto_log.AutoLogger(**kwargs)`` when it is importable and ``inference_config`` is a Paddle
    Config (auto_log reads it), else AutoLogReport (which also takes a dict of conf fields)."""
    config = kwargs.get("inference_config")
    if auto_log_available() and config is not None and not isinstance(config, dict):
        import auto_log

        return auto_log.AutoLogger(**kwargs)
    return AutoLogReport(**kwargs)


def report(autolog) -> None:
    """Print the report. auto_log's own report() ends with sys.exit(0); keep the process alive."""
    try:
        autolog.report()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
