"""``centernet2-pipeline STAGE [ARGS]``: one entry point for the pipeline's stages.

Each stage is also a module: ``centernet2-pipeline prepare ...`` is ``python -m pipeline.data.prepare ...``.
"""
import importlib
import sys

STAGES = {
    "env": "pipeline.env",
    "prepare": "pipeline.data.prepare",
    "demo": "pipeline.demo",
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown stage {argv[0]!r}; allowed: {', '.join(STAGES)}", file=sys.stderr)
        print(f"usage: centernet2-pipeline {{{','.join(STAGES)}}} [ARGS...]", file=sys.stderr)
        sys.exit(2 if argv and argv[0] not in ("-h", "--help") else 0)
    importlib.import_module(STAGES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
