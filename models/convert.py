"""Convert a torchvision checkpoint into a Paddle .pdparams for one of our backbones.

    python -m models.convert --backbone resnet18 --input resnet18-f37072fd.pth --output resnet18.pdparams

The output holds exactly the extractor's parameters and BatchNorm statistics (stem and
stages 1-3), so `--pretrained_backbone OUTPUT` loads it without conversion.
"""

from __future__ import annotations

import sys

import paddle

from models.backbones import BACKBONES, build_backbone, get_backbone_state
from models.torch_weights import WeightsError
from utils.cli import new_parser
from utils.files import temp_path_beside


def parse_args(argv=None):
    parser = new_parser(
        "Convert a torchvision (or Paddle) checkpoint into a Paddle .pdparams holding the backbone "
        "layers PaDiM uses. torch is not needed; nothing in the input file is executed.",
        prog="python -m models.convert",
    )
    parser.add_argument(
        "--backbone", required=True, choices=BACKBONES,
        help="network the checkpoint belongs to; the converted weights are checked against it",
    )
    parser.add_argument(
        "--input", required=True,
        help="torchvision checkpoint (.pth/.pt, zip or legacy format; a {'state_dict': ...} "
        "wrapper is fine) or a Paddle .pdparams",
    )
    parser.add_argument(
        "--output", required=True,
        help="Paddle weights file to write (.pdparams); written atomically, replaced if present",
    )
    return parser.parse_args(argv)


def save_state_atomically(state: dict, output: str) -> None:
    """Write with paddle.save to a temp file next to `output`, then rename: never a half file."""
    with temp_path_beside(output, suffix=".pdparams.tmp") as temp_path:
        paddle.save(state, temp_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # build_backbone renames torch keys, drops fc/layer4/classifier and checks the fit.
        extractor = build_backbone(args.backbone, weights=args.input)
        state = get_backbone_state(extractor)
        save_state_atomically(state, args.output)
    except (WeightsError, OSError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    print(f"wrote {len(state)} {args.backbone} tensors from {args.input} to {args.output}")
    return 0


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(lambda: sys.exit(main()), keep_buffers=False)   # SIGTERM removes the temp file too
