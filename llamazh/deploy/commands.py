"""``llamazh export-gguf``: a merged model directory to one GGUF file for llama.cpp."""

from __future__ import annotations

import argparse

from llamazh.cli import Handler, command, progress


@command("export-gguf", help="write a Llama-family model directory as a GGUF file for llama.cpp")
def _export_gguf(parser: argparse.ArgumentParser) -> Handler:
    from llamazh.deploy.gguf_export import GGUF_DTYPES

    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="model directory with its tokenizer files"
    )
    parser.add_argument("out", metavar="OUT.gguf", help="the GGUF file to create")
    parser.add_argument(
        "--dtype", choices=GGUF_DTYPES, default="f16", help="type of the 2-D weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")

    def run(args: argparse.Namespace) -> int:
        from llamazh.deploy import export_gguf

        progress(f"exporting {args.model_dir} as {args.dtype} GGUF")
        out = export_gguf(
            args.model_dir, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=True
        )
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0

    return run
