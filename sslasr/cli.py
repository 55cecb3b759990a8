"""The `sslasr` command: tools outside the recipes' stages, one subcommand each.

    sslasr import-hf DIR --out exp/pretrain_wav2vec2_imported_DIR/model_final.pt
        a transformers model directory (config.json + weights) → a checkpoint in our pretraining
        format and, next to it, frontend.yaml with the architecture for fine-tuning configs
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from sslasr.utils.logging import setup_logging


def _import_hf(args: argparse.Namespace) -> int:
    from sslasr.models.hf_import import import_hf, save_imported

    imported = import_hf(args.dir)
    frontend_yaml = save_imported(imported, args.out)
    params = sum(t.numel() for t in imported.encoder_state.values())
    logging.info("imported %s (%s, %d tensors, %.2fM parameters) as frontend %r into %s; architecture in %s",
                 args.dir, imported.source["model_type"], len(imported.encoder_state), params / 1e6,
                 imported.frontend["name"], args.out, frontend_yaml)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslasr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hf = commands.add_parser(
        "import-hf", help="import a transformers checkpoint (wav2vec2, hubert, wavlm, wav2vec2-bert)",
        description="Convert a transformers model directory (config.json + model.safetensors or "
                    "pytorch_model.bin) into our pretraining checkpoint format; frontend.yaml next to "
                    "--out holds its architecture (and data.normalize_waveform, normalize_eps: the directory's "
                    "preprocessor_config.json do_normalize, else transformers' default, true).")
    hf.add_argument("dir", type=Path, help="transformers model directory")
    hf.add_argument("--out", type=Path, required=True, help="checkpoint to write (e.g. .../model_final.pt)")
    hf.set_defaults(run=_import_hf)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"sslasr {args.command}: {err}")


if __name__ == "__main__":
    sys.exit(main())
