"""The ``mlflow-lance`` command: inspect and maintain weight datasets.

Every command takes a TARGET: a Lance dataset URI (a path, file://, s3://, ...) or the name
of a registered model logged with mlflow_lance (its dataset is found through the registry).
Tables by default, ``--json`` for scripts. Exit codes: 0 success, 1 verification found
problems, 2 bad usage or input (including a corrupt or crafted dataset, and storage that
cannot be reached), 3 dataset, version, tag or model not found, 4 internal error (a bug:
the traceback is printed; please report it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import timedelta

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERNAL = 0, 1, 2, 3, 4

EXAMPLES = {
    "versions": "mlflow-lance versions ./weights.lance\n  mlflow-lance versions churn-model --json",
    "diff": "mlflow-lance diff ./weights.lance 3 7\n  mlflow-lance diff churn-model 3      # 3 against latest",
    "tag": "mlflow-lance tag ./weights.lance best 7\n  mlflow-lance tag ./weights.lance best --delete",
    "verify": "mlflow-lance verify ./weights.lance\n  mlflow-lance verify s3://bucket/lance/models/x.lance --version best",
    "gc": "mlflow-lance gc churn-model              # what MLflow no longer references\n"
    "  mlflow-lance gc --all --dry-run\n  mlflow-lance gc ./weights.lance --keep-last 5   # a dataset MLflow never wrote to",
    "export": "mlflow-lance export ./weights.lance model.safetensors --version 7",
    "import": "mlflow-lance import ./weights.lance pytorch_model.bin -m 'from the hub checkpoint'\n"
    "  mlflow-lance import ./weights.lance model.safetensors",
    "sync": "mlflow-lance sync churn-model\n  mlflow-lance sync s3://bucket/lance/models/churn-3f9a1c0b2e4d.lance\n"
    "  mlflow-lance sync --all",
}


def _version(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.isdigit() else text


def _resolve(target: str) -> str:
    """A dataset URI for TARGET (a URI or path as is; else a registered model's dataset)."""
    if "://" in target or os.path.exists(target) or target.endswith(".lance"):  # as lifecycle.looks_like_dataset
        return target
    from .registry import dataset_for_model

    return dataset_for_model(target)


def _opts(uri: str) -> dict[str, str] | None:
    from .artifacts import storage_options_for

    return storage_options_for(uri) or None


def _table(rows: list[dict], columns: Sequence[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def _emit(args: argparse.Namespace, payload, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def _bar(args: argparse.Namespace, total: int | None, unit: str, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, file=sys.stderr,
                disable=args.json or not sys.stderr.isatty() and not args.progress)  # fmt: skip


# --------------------------------------------------------------------------- commands


def cmd_versions(args: argparse.Namespace) -> int:
    from . import store

    uri = _resolve(args.target)
    infos = store.versions(uri, storage_options=_opts(uri))
    rows = [
        {
            "version": v.version,
            "time": v.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
            "tensors": v.num_tensors,
            "changed": len(v.changed),
            "bytes": f"{v.total_bytes:,}",
            "written": f"{v.bytes_written:,}",
            "run": v.properties.get("mlflow.run_id", "")[:12],
            "tags": ",".join(v.tags),
            "message": (v.message or "")[:40],
        }
        for v in infos
    ]
    _emit(args, [asdict(v) for v in infos], f"{uri}\n" + _table(rows, list(rows[0]) if rows else ["version"]))
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from . import store

    uri = _resolve(args.target)
    d = store.diff(uri, _version(args.a), _version(args.b), storage_options=_opts(uri))
    lines = [f"{uri}: version {d.a} -> {d.b}"]
    for label, names in (("added", d.added), ("removed", d.removed), ("changed", d.changed)):
        lines += [f"  {label[0].upper() if label != 'changed' else 'M'} {n}" for n in names]
    lines.append(f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, "
                 f"{len(d.unchanged)} unchanged")
    _emit(args, asdict(d), "\n".join(lines))
    return EXIT_OK


def cmd_tag(args: argparse.Namespace) -> int:
    from . import store

    uri = _resolve(args.target)
    if args.delete:
        store.untag(uri, args.name, storage_options=_opts(uri))
        _emit(args, {"tag": args.name, "deleted": True}, f"removed tag {args.name!r}")
        return EXIT_OK
    if args.version is None:
        raise ValueError("give a VERSION to tag, or --delete")
    store.tag(uri, args.name, int(args.version), storage_options=_opts(uri))
    _emit(args, {"tag": args.name, "version": int(args.version)}, f"tag {args.name!r} -> version {args.version}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from . import store

    uri = _resolve(args.target)
    opts = _opts(uri)
    version = store.resolve_version(uri, _version(args.version), storage_options=opts)
    try:
        total = next(v.total_bytes for v in store.versions(uri, storage_options=opts) if v.version == version)
    except store.WeightsError:  # a malformed commit: verify reports it; the bar has no total
        total = None
    with _bar(args, total, "B", "verify") as bar:
        report = store.verify(uri, version, storage_options=opts, progress=bar.update)
    text = [f"{uri} version {report.version}: {report.tensors} tensors, {report.chunks} chunks, "
            f"{report.bytes:,} bytes checked"]  # fmt: skip
    text += [f"  CORRUPT {p.name} (chunk {p.chunk}) {p.file}: {p.detail}" for p in report.problems]
    text.append("OK" if report.ok else f"{len(report.problems)} problem(s)")
    _emit(args, {**asdict(report), "ok": report.ok}, "\n".join(text))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _target_or_all(args: argparse.Namespace) -> None:
    if (args.target is None) == (not args.all):
        raise ValueError("give a TARGET (dataset URI or registered model name) or --all, not both")


def cmd_gc(args: argparse.Namespace) -> int:
    from .lifecycle import gc

    _target_or_all(args)
    older = timedelta(days=args.older_than_days) if args.older_than_days is not None else None
    results = gc(args.target, all=args.all, keep_last=args.keep_last, older_than=older,
                 grace=timedelta(minutes=args.grace_minutes), dry_run=args.dry_run,
                 assume_logged_here=args.assume_logged_here)  # fmt: skip
    verb = "would remove" if args.dry_run else "removed"
    lines = []
    for r in results:
        if r.skipped:
            lines.append(f"{r.dataset}: skipped: {r.skipped}")
            continue
        freed = "" if args.dry_run else f" ({r.bytes_removed:,} bytes freed)"
        lines.append(f"{r.dataset}: {verb} versions {r.removed_versions or 'none'}{freed}; "
                     f"{len(r.kept_referenced)} versions referenced by MLflow; "
                     f"unpinned {len(r.unpinned)}, pinned {len(r.pinned)}")  # fmt: skip
    total = sum(r.bytes_removed for r in results)
    if not args.dry_run:
        lines.append(f"{sum(len(r.removed_versions) for r in results)} versions, {total:,} bytes freed")
    _emit(args, [asdict(r) for r in results], "\n".join(lines) or "no datasets found")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from . import store

    uri = _resolve(args.target)
    sd = store.load_state_dict(uri, _version(args.version), storage_options=_opts(uri), names="*")  # flat, trees too
    seen: dict[int, str] = {}
    out = {}
    with _bar(args, len(sd), "tensor", "export") as bar:
        for name, t in sd.items():  # safetensors stores shared tensors once only if told; copy ties
            out[name] = t.clone() if id(t) in seen else t.contiguous()
            seen[id(t)] = name
            bar.update(1)
    save_file(out, args.output, metadata={"mlflow_lance.source": uri, "mlflow_lance.tensors": str(len(out))})
    _emit(args, {"output": args.output, "tensors": len(out)}, f"wrote {len(out)} tensors to {args.output}")
    return EXIT_OK


def _read_checkpoint(path: str) -> dict:
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def cmd_import(args: argparse.Namespace) -> int:
    from . import store

    uri = _resolve(args.target)
    sd = _read_checkpoint(args.input)
    with _bar(args, 1, "version", "import") as bar:
        info = store.save_state_dict(sd, uri, message=args.message or f"imported from {os.path.basename(args.input)}",
                                     storage_options=_opts(uri))  # fmt: skip
        bar.update(1)
    _emit(args, asdict(info), f"version {info.version}: {info.num_tensors} tensors, {len(info.changed)} changed, "
          f"{info.bytes_written:,} bytes written")  # fmt: skip
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    from .registry import sync

    _target_or_all(args)
    reports = sync(args.target, all=args.all)
    lines = [
        f"{r.dataset}: skipped: {r.skipped}" if r.skipped else
        f"{r.dataset}: " + (f"{r.registered_model}: {len(r.model_versions)} model versions, " if r.registered_model else "")
        + f"{r.runs} runs; pinned {r.pinned or 'nothing new'}; unpinned {r.unpinned or 'nothing'}"
        for r in reports
    ]  # fmt: skip
    _emit(args, [asdict(r) for r in reports], "\n".join(lines) or "nothing to sync")
    return EXIT_OK


# --------------------------------------------------------------------------- wiring


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlflow-lance", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog="example:\n  " + EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
        p.set_defaults(fn=fn)
        return p

    target = {"help": "dataset URI or registered model name"}
    p = add("versions", cmd_versions, "list versions: time, tensors, changed, bytes written, run, tags")
    p.add_argument("target", **target)
    p = add("diff", cmd_diff, "tensors added, removed and changed between two versions")
    p.add_argument("target", **target)
    p.add_argument("a", help="version number or tag")
    p.add_argument("b", nargs="?", help="version number or tag (default: latest)")
    p = add("tag", cmd_tag, "point a tag at a version (tagged versions survive gc), or --delete it")
    p.add_argument("target", **target)
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    p.add_argument("--delete", action="store_true")
    p = add("verify", cmd_verify, "recompute every content hash of a version; exit 1 on any mismatch")
    p.add_argument("target", **target)
    p.add_argument("--version", help="version number or tag (default: latest)")
    p = add("gc", cmd_gc, "remove the versions nothing references (MLflow decides for datasets it logged to) "
                          "and the files only they use")
    p.add_argument("target", nargs="?", **target)
    p.add_argument("--all", action="store_true", help="every dataset under the Lance roots and every registered model's")
    p.add_argument("--keep-last", type=int, help="also keep the N newest versions (required for datasets MLflow "
                                                 "never wrote to, unless --older-than-days is given)")
    p.add_argument("--older-than-days", type=float)
    p.add_argument("--grace-minutes", type=float, default=30.0,
                   help="keep versions superseded less than this long ago (default 30)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--assume-logged-here", action="store_true",
                   help="trust that this tracking server logged the dataset even though it knows none of its "
                        "experiments, runs or models (they were all purged)")
    p = add("export", cmd_export, "write a version to a safetensors file")
    p.add_argument("target", **target)
    p.add_argument("output")
    p.add_argument("--version", help="version number or tag (default: latest)")
    p = add("import", cmd_import, "save a safetensors or torch .pt/.bin state dict as a new version")
    p.add_argument("target", **target)
    p.add_argument("input")
    p.add_argument("-m", "--message")
    p = add("sync", cmd_sync, "reconcile pins, UI tags, history and sidecars with what MLflow references")
    p.add_argument("target", nargs="?", **target)
    p.add_argument("--all", action="store_true", help="every registered model and every dataset under the Lance roots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import store

    try:
        return args.fn(args)
    except (FileNotFoundError, store.VersionNotFoundError) as err:
        print(f"mlflow-lance {args.command}: {err}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (KeyError, IndexError):  # lookups that failed inside the code: a bug, not "not found"
        return _internal(args)
    except LookupError as err:  # the registry has no such model
        print(f"mlflow-lance {args.command}: {err}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (ValueError, TypeError, PermissionError, ConnectionError) as err:
        print(f"mlflow-lance {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 - anything else is a bug: exit 4 with its traceback
        return _internal(args)


def _internal(args: argparse.Namespace) -> int:
    """Report an unexpected exception (being handled) with its traceback: exit code 4."""
    traceback.print_exc()
    print(f"mlflow-lance {args.command}: internal error (exit code {EXIT_INTERNAL}); please report "
          f"it with the traceback above", file=sys.stderr)  # fmt: skip
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
