"""`studio library list|show|add|rename|remove|import`: the adapter library from the command line."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from studio.library import KINDS

    p = sub.add_parser("library", help="keep adapters: list, show, add, rename, remove, import",
                       description="The adapter library under the studio home ($STUDIO_HOME, else ~/.studio): "
                                   "a database of adapters with their method, kind, base family and trigger words, "
                                   "and a folder of files per adapter.")
    lib = p.add_subparsers(dest="library_command", metavar="ACTION")
    lib.required = True

    ls = lib.add_parser("list", help="a table of the adapters (or those matching TEXT)")
    ls.add_argument("query", nargs="?", default="", metavar="TEXT",
                    help="only adapters whose name, trigger words or description contain TEXT")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=run_list)

    show = lib.add_parser("show", help="every field of one adapter")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=run_show)

    add = lib.add_parser("add", help="copy an adapter file or folder into the library",
                         description="Copy an adapter into the library: a studio training folder (its samples "
                                     "come along), a diffusers pytorch_lora_weights.safetensors, or a kohya / "
                                     "LyCORIS file (LoRA, LoCon, LoHa, LoKr). Prints the name it was added as.")
    add.add_argument("path", metavar="PATH")
    add.add_argument("--name", help="library name (default: the folder or file name)")
    add.add_argument("--description", default="", help="free text kept with the adapter")
    add.add_argument("--kind", choices=KINDS, help="subject, style, content or other (default: what the file says)")
    add.add_argument("--replace", action="store_true", help="overwrite the adapter of that name if there is one")
    add.set_defaults(func=run_add)

    ren = lib.add_parser("rename", help="rename an adapter")
    ren.add_argument("old", metavar="OLD")
    ren.add_argument("new", metavar="NEW")
    ren.set_defaults(func=run_rename)

    rm = lib.add_parser("remove", help="delete an adapter and its files")
    rm.add_argument("name")
    rm.set_defaults(func=run_remove)

    imp = lib.add_parser("import", help="add every adapter file or folder found in a folder",
                         description="Add every adapter found in DIR (recursively): adapter folders and "
                                     ".safetensors files. Prints the names added; says which were skipped and why.")
    imp.add_argument("folder", metavar="DIR")
    imp.set_defaults(func=run_import)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def run_list(args: argparse.Namespace) -> int:
    from studio.library import Library, format_time

    lib = Library()
    records = lib.find(args.query)
    if args.json:
        print(json.dumps([r.to_dict() for r in records]))
        return 0
    if not records:
        log.info("no adapters%s in the library (%s); add some with `studio library add PATH`",
                 f" matching {args.query!r}" if args.query else "", lib.home)
        return 0
    rows = [[r.name, r.kind, r.method, r.family or "?", _short(", ".join(r.triggers), 32), format_time(r.created)]
            for r in records]
    for line in _table(rows, ["name", "kind", "method", "family", "triggers", "created"]):
        print(line)
    return 0


def _show_lines(d: dict[str, Any]) -> list[str]:
    from studio.library import format_time

    base = d["base"] + (f" (hash {d['base_hash']})" if d["base_hash"] else "")
    lines = [
        f"name         {d['name']}", f"kind         {d['kind']}", f"method       {d['method']}",
        f"family       {d['family'] or '? (the file does not say)'}", f"base         {base or '?'}",
        f"triggers     {', '.join(d['triggers']) or '-'}", f"description  {d['description'] or '-'}",
        f"created      {format_time(d['created'])}", f"folder       {d['path']}", f"file         {d['file']}",
        f"sha256       {d['file_hash']}",
        f"embedding    {str(d['embedding']) + '-d vector' if d['embedding'] else 'none'}",
        f"samples      {len(d['samples'])}",
    ]
    lines += [f"  {s}" for s in d["samples"]]
    lines.append("train config" + ("" if d["train_config"] else " -"))
    lines += [f"  {k} = {json.dumps(v) if not isinstance(v, str) else v}" for k, v in d["train_config"].items()]
    return lines


def run_show(args: argparse.Namespace) -> int:
    from studio.library import Library

    lib = Library()
    record = lib.get(args.name)
    vector = lib.embedding(record.name)
    d = {**record.to_dict(), "embedding": None if vector is None else int(vector.shape[0])}
    if args.json:
        print(json.dumps(d))
        return 0
    for line in _show_lines(d):
        print(line)
    return 0


def run_add(args: argparse.Namespace) -> int:
    from studio.library import Library

    record = Library().add(args.path, name=args.name, description=args.description, replace=args.replace,
                           kind=args.kind)
    from studio.autolora.retrieval import embed_on_add

    embed_on_add([record.name])  # AutoLoRA's retrieval vector (docs/autolora.md)
    print(record.name)
    return 0


def run_rename(args: argparse.Namespace) -> int:
    from studio.library import Library

    print(Library().rename(args.old, args.new).name)
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from studio.library import Library

    Library().remove(args.name)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from studio.library import Library

    records = Library().import_dir(args.folder)
    from studio.autolora.retrieval import embed_on_add

    embed_on_add([r.name for r in records])  # AutoLoRA's retrieval vectors (docs/autolora.md)
    for record in records:
        print(record.name)
    return 0
