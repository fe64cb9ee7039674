"""`eu-convert`: Hugging Face / GGUF checkpoints in, eu_jax checkpoints, Hugging Face directories out."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from eu_jax.files import local_path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1024' -> 1024."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eu-convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="HF directory (safetensors) or .gguf file -> eu_jax checkpoint")
    imp.add_argument("src", type=local_path, help="Hugging Face model directory or .gguf file")
    imp.add_argument("out", type=local_path, help="new eu_jax checkpoint directory")
    imp.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    imp.add_argument("--mesh", default="data=1,fsdp=-1", help="device mesh the params are placed on, e.g. fsdp=-1,tensor=2")

    exp = sub.add_parser("export", help="eu_jax checkpoint (params or train state) -> HF directory")
    exp.add_argument("ckpt", type=local_path, help="eu_jax params checkpoint, training run directory or step folder")
    exp.add_argument("out", type=local_path, help="new Hugging Face model directory")
    exp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    exp.add_argument("--max-shard-size", type=parse_size, default="5GB", help="safetensors shard size (default 5GB)")

    ver = sub.add_parser("verify", help="compare an eu_jax checkpoint with transformers' PyTorch model")
    ver.add_argument("source", type=local_path, help="the Hugging Face directory or .gguf file it came from")
    ver.add_argument("ckpt", type=local_path, help="eu_jax checkpoint")
    ver.add_argument("--prompt", action="append", dest="prompts", help="prompt to compare on (repeatable)")
    ver.add_argument("--atol", type=float, default=1e-2, help="largest allowed |logit difference|")
    ver.add_argument("--max-kl", type=float, default=1e-5, help="largest allowed mean KL per token")

    for p in (imp, ver):
        p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin pickles (they can run code)")
    for p in (imp, exp, ver):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "import":
        from eu_jax.convert.hf_import import import_checkpoint
        from eu_jax.models.config import RuntimeOptions
        from eu_jax.parallel.mesh import make_mesh, parse_mesh_spec

        options = RuntimeOptions(param_dtype=args.param_dtype)
        out = import_checkpoint(
            args.src, args.out, options, make_mesh(parse_mesh_spec(args.mesh)), args.allow_pickle, not args.quiet
        )
        print(f"imported {args.src} -> {out}")
        return 0
    if args.command == "export":
        from eu_jax.convert.export import export_checkpoint

        out = export_checkpoint(args.ckpt, args.out, args.dtype, args.max_shard_size, not args.quiet)
        print(f"exported {args.ckpt} -> {out} ({args.dtype})")
        return 0
    from eu_jax.compile_cache import enable_compilation_cache
    from eu_jax.convert.verify import DEFAULT_PROMPTS, verify_checkpoint

    enable_compilation_cache()  # only verify compiles (a forward of the model)
    report = verify_checkpoint(args.source, args.ckpt, args.prompts or DEFAULT_PROMPTS, args.allow_pickle)
    print(report)
    if report.passes(args.atol, args.max_kl):
        print(f"OK: within atol={args.atol:g} and max-kl={args.max_kl:g}")
        return 0
    print(f"FAILED: above atol={args.atol:g} or max-kl={args.max_kl:g}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # bad input, or a file that cannot be read: one sentence, no traceback
        print(f"eu-convert {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
