"""``textsegment weights list|import|verify``: see, bring in and check the weights on this machine.

Nothing here touches the network: downloads happen only when a model is loaded online.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="list, import and verify model weights",
        description="Known model weights: bundled, cached ($TEXTSEGMENT_HOME), downloadable or missing. "
        "Offline (TEXTSEGMENT_OFFLINE=1 or HF_HUB_OFFLINE=1), bring weights in with `weights import FILE`.",
    )
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list",
        help="known weights and where they are",
        description="Known weights and where they are. DEFAULT yes: the weights a model loads when --weights is not given.",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=run)

    importing = actions.add_parser("import", help="copy a checkpoint file into the cache (the file is left as it is)")
    importing.add_argument("path", metavar="PATH", help="a TextSegment checkpoint (.safetensors)")
    importing.add_argument("--id", dest="weights_id", help="id to use with --weights (default: the file name)")
    importing.add_argument("--replace", action="store_true",
                           help="replace weights imported before under the same id with other contents")
    importing.set_defaults(func=run)

    verify = actions.add_parser("verify", help="re-hash the weights on this machine; exit 1 if any is tampered or unreadable")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import weights

    if args.weights_action == "list":
        states = weights.list_weights()
        if args.json:
            print(json.dumps([s.to_dict() for s in states], indent=2))
            return 0
        rows = [
            (s.entry.id, _model_column(s.entry), "yes" if s.default else "-", s.entry.version or "-", s.entry.kind,
             s.status, _size(s.entry.size), s.entry.licence)
            for s in states
        ]
        _table(("ID", "MODEL", "DEFAULT", "VERSION", "KIND", "STATUS", "SIZE", "LICENCE"), rows)
        if not rows:
            print("no weights are known; import a checkpoint with `textsegment weights import FILE`")
        return 0

    if args.weights_action == "import":
        entry = weights.import_weights(args.path, weights_id=args.weights_id, replace=args.replace)
        print(f"imported {args.path} as {entry.id} (model {entry.model}, sha256 {entry.sha256}); use --weights {entry.id}")
        return 0

    results = weights.verify_weights()
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        _table(("STATUS", "ID", "PATH / NOTE"), [(r.status, r.entry.id, _note(r)) for r in results])
    return 1 if any(r.status in ("tampered", "unreadable") for r in results) else 0


def _note(result: Any) -> str:
    if result.status in ("tampered", "unreadable", "leftover"):
        return result.message
    return str(result.path) if result.path else result.message


def _model_column(entry: Any) -> str:
    """The presets weights are for: a backbone's 64-character hub id made every row of the table wide,
    and did not say that freqmedclip-base and tgcnet-base are the models that load it (``--json`` keeps the id)."""
    if entry.kind != "backbone":
        return entry.model
    from ..models import get_model_config, list_models

    users = [name for name in list_models() if getattr(get_model_config(name), "clip_source", None) == entry.model]
    return f"{', '.join(users)} (backbone)" if users else entry.model


def _size(size: Optional[int]) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        print("  ".join([*cells, str(row[-1])]))
