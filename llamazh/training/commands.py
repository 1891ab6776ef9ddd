"""``llamazh merge-adapters``: fold LoRA adapters into a base model directory."""

from __future__ import annotations

import argparse

from llamazh.cli import Handler, command, progress


@command(
    "merge-adapters",
    help="merge PEFT LoRA adapters (in order) into BASE_DIR and write a plain model directory",
)
def _merge_adapters(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("base", metavar="BASE_DIR", help="the base model directory (safetensors)")
    parser.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER",
        help="adapter directories, applied in the order given",
    )
    parser.add_argument("-o", "--output", required=True, help="the model directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled adapter_model.bin files (tensors only: weights_only=True)",
    )

    def run(args: argparse.Namespace) -> int:
        from llamazh.training import merge_adapters

        progress(f"merging {len(args.adapters)} adapter(s) into {args.base}, shard by shard")
        out = merge_adapters(
            args.base,
            args.adapters,
            args.output,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            progress=True,
        )
        print(f"wrote {out}")
        return 0

    return run
