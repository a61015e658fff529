"""The ``mlflow-lance`` command: inspect and maintain weight datasets.

Every command takes a TARGET: a Lance dataset URI (a path, file://, s3://, ...) or the name
of a registered model logged with mlflow_lance (its dataset is found through the registry).
Tables by default, ``--json`` for scripts. Exit codes: 0 success, 1 verification found
problems, 2 bad usage or input (including a corrupt or crafted dataset, and storage that
cannot be reached), 3 dataset, version, tag or model not found, 4 internal error (a bug:
the traceback is printed; please report it).

Text output shows every character a terminal could act on (controls, DEL, C1 controls, bidi
overrides and other non-printing characters) as an escape such as \\x1b or \\u009b: names,
messages, paths and errors come from datasets and registries someone else may have written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import stat
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    from .registry import SyncReport

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERNAL = 0, 1, 2, 3, 4

EXAMPLES = {
    "versions": "mlflow-lance versions ./weights.lance\n  mlflow-lance versions churn-model --json",
    "diff": "mlflow-lance diff ./weights.lance 3 7\n  mlflow-lance diff churn-model 3      # 3 against latest",
    "tag": "mlflow-lance tag ./weights.lance best 7\n  mlflow-lance tag ./weights.lance best --delete",
    "verify": "mlflow-lance verify ./weights.lance\n"
    "  mlflow-lance verify s3://bucket/lance/models/x.lance --version best",
    "gc": "mlflow-lance gc churn-model              # what MLflow no longer references\n"
    "  mlflow-lance gc --all --dry-run\n"
    "  mlflow-lance gc ./weights.lance --keep-last 5   # a dataset MLflow never wrote to",
    "export": "mlflow-lance export ./weights.lance model.safetensors --version 7",
    "import": "mlflow-lance import ./weights.lance pytorch_model.bin -m 'from the hub checkpoint'\n"
    "  mlflow-lance import ./weights.lance model.safetensors",
    "bundle": "mlflow-lance bundle models:/churn@champion ./churn-bundle\n"
    "  mlflow models serve -m ./churn-bundle --env-manager local",
    "sync": "mlflow-lance sync churn-model\n  mlflow-lance sync s3://bucket/lance/models/churn-3f9a1c0b2e4d.lance\n"
    "  mlflow-lance sync --all",
}


_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_MAX_VERSION = 2**64 - 1  # Lance numbers versions with a u64


def printable(text: object) -> str:
    """``str(text)`` with every character a terminal could act on written as a visible escape:
    C0 controls (tab and newline too, so that one field stays on one line), DEL, C1 controls
    (U+0080-U+009F) and every other character Python does not count as printable (bidi
    overrides such as U+202E, zero-width and format characters, separators other than the
    space, surrogates, unassigned code points). Printable text, backslashes included, is kept
    as is, so ``printable(printable(x)) == printable(x)``."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _ESCAPES.get(c) or _escape(ord(c)) for c in s)


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _say(text: str, file: TextIO | None = None) -> None:
    """Print ``text`` (stdout by default), every line of it through :func:`printable`."""
    print("\n".join(map(printable, text.split("\n"))), file=file or sys.stdout)


def _version(text: str) -> int | str:
    """argparse type of a VERSION argument: a version number, else a tag name."""
    return _version_number(text) if text.isascii() and text.isdigit() else text


def _version_number(text: str) -> int:
    """argparse type of a version number (Lance numbers versions with a u64)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) > _MAX_VERSION:
        raise argparse.ArgumentTypeError(f"not a version number from 0 to {_MAX_VERSION}: {text!r}")
    return int(text)


def _duration(unit: str) -> Callable[[str], timedelta]:
    """An argparse type: a number of ``unit`` (days, minutes) as a timedelta that reaches back
    from now no further than the year 1 (gc subtracts it from the current time)."""

    def parse(text: str) -> timedelta:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{unit} must be a finite number >= 0, got {text!r}")
        try:
            span = timedelta(**{unit: value})
            datetime.now(timezone.utc) - span
        except OverflowError:
            raise argparse.ArgumentTypeError(
                f"{text} {unit} is out of range: it reaches back before the year 1"
            ) from None
        return span

    return parse


def _resolve(target: str) -> str:
    """A dataset URI for TARGET (a URI or path as is; else a registered model's dataset)."""
    from .artifacts import is_dataset_target

    if is_dataset_target(target):
        return target
    from .registry import dataset_for_model

    return dataset_for_model(target)


def _opts(uri: str) -> dict[str, str] | None:
    from .artifacts import options

    return options(uri)


def _table(rows: list[dict], columns: Sequence[str]) -> str:
    cells = [[printable(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def _emit(args: argparse.Namespace, payload: object, text: str) -> None:
    """``payload`` as JSON with ``--json`` (ASCII only: every control, C1 and non-ASCII character
    is a \\u escape), else ``text``, whose fields the command has passed through ``printable``."""
    _say(json.dumps(payload, indent=2, default=str, ensure_ascii=True) if args.json else text)


def _bar(args: argparse.Namespace, total: int | None, unit: str, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit=unit,
        unit_scale=unit == "B",
        desc=desc,
        file=sys.stderr,
        disable=args.json or not sys.stderr.isatty() and not args.progress,
    )


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
            "run": printable(v.properties.get("mlflow.run_id", ""))[:12],  # escaped, then cut
            "tags": ",".join(v.tags),
            "message": printable(v.message or "")[:40],
        }
        for v in infos
    ]
    header = printable(uri) + "\n"
    _emit(args, [asdict(v) for v in infos], header + _table(rows, list(rows[0]) if rows else ["version"]))
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from . import store

    uri = _resolve(args.target)
    d = store.diff(uri, args.a, args.b, storage_options=_opts(uri))
    lines = [f"{printable(uri)}: version {d.a} -> {d.b}"]
    for mark, names in (("A", d.added), ("R", d.removed), ("M", d.changed)):
        lines += [f"  {mark} {printable(n)}" for n in names]
    lines.append(
        f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, {len(d.unchanged)} unchanged"
    )
    _emit(args, asdict(d), "\n".join(lines))
    return EXIT_OK


def cmd_tag(args: argparse.Namespace) -> int:
    from . import store

    uri = _resolve(args.target)
    if args.delete:
        store.untag(uri, args.name, storage_options=_opts(uri))
        _emit(args, {"tag": args.name, "deleted": True}, f"removed tag '{printable(args.name)}'")
        return EXIT_OK
    if args.version is None:
        raise ValueError("give a VERSION to tag, or --delete")
    store.tag(uri, args.name, args.version, storage_options=_opts(uri))
    _emit(
        args,
        {"tag": args.name, "version": args.version},
        f"tag '{printable(args.name)}' -> version {args.version}",
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from . import store

    uri = _resolve(args.target)
    opts = _opts(uri)
    version = store.resolve_version(uri, args.version, storage_options=opts)
    try:
        total = next(v.total_bytes for v in store.versions(uri, storage_options=opts) if v.version == version)
    except store.WeightsError:  # a malformed commit: verify reports it; the bar has no total
        total = None
    with _bar(args, total, "B", "verify") as bar:
        report = store.verify(uri, version, storage_options=opts, progress=bar.update)
    text = [
        (
            f"{printable(uri)} version {report.version}: {report.tensors} tensors, {report.chunks} chunks, "
            f"{report.bytes:,} bytes checked"
        )
    ]
    text += [
        f"  CORRUPT {printable(p.name)} (chunk {p.chunk}) {printable(p.file)}: {printable(p.detail)}"
        for p in report.problems
    ]
    text.append("OK" if report.ok else f"{len(report.problems)} problem(s)")
    _emit(args, {**asdict(report), "ok": report.ok}, "\n".join(text))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _target_or_all(args: argparse.Namespace) -> None:
    if (args.target is None) == (not args.all):
        raise ValueError("give a TARGET (dataset URI or registered model name) or --all, not both")


def cmd_gc(args: argparse.Namespace) -> int:
    from .lifecycle import gc

    _target_or_all(args)
    results = gc(
        args.target,
        all=args.all,
        keep_last=args.keep_last,
        older_than=args.older_than_days,
        grace=args.grace_minutes,
        dry_run=args.dry_run,
        assume_logged_here=args.assume_logged_here,
    )
    verb = "would remove" if args.dry_run else "removed"
    lines = []
    for r in results:
        if r.skipped:
            lines.append(f"{printable(r.dataset)}: skipped: {printable(r.skipped)}")
            continue
        freed = "" if args.dry_run else f" ({r.bytes_removed:,} bytes freed)"
        lines.append(
            f"{printable(r.dataset)}: {verb} versions {r.removed_versions or 'none'}{freed}; "
            f"{_kept(r.kept)}; unpinned {len(r.unpinned)}, pinned {len(r.pinned)}"
        )
    total = sum(r.bytes_removed for r in results)
    if not args.dry_run:
        lines.append(f"{sum(len(r.removed_versions) for r in results)} versions, {total:,} bytes freed")
    _emit(args, [asdict(r) for r in results], "\n".join(lines) or "no datasets found")
    return EXIT_OK


_KEPT_BECAUSE = {  # gc's reasons, in the order the summary names them
    "mlflow_reference": "referenced by MLflow",
    "tag": "tagged",
    "latest": "latest",
    "keep_last": "within keep_last",
    "older_than": "newer than older_than",
    "grace": "within the grace period",
    "not_logged_by_mlflow": "not logged by MLflow",
}


def _kept(kept: dict[int, list[str]]) -> str:
    """'kept 3 versions: 2 referenced by MLflow, 1 tagged, ...': a version kept for several
    reasons counts under each."""
    counts = dict.fromkeys(_KEPT_BECAUSE, 0)
    for why in kept.values():
        for reason in {r.split(":", 1)[0] for r in why}:
            counts[reason] = counts.get(reason, 0) + 1
    because = ", ".join(f"{n} {_KEPT_BECAUSE.get(r, r)}" for r, n in counts.items() if n)
    return f"kept {len(kept)} version{'' if len(kept) == 1 else 's'}" + (f": {because}" if because else "")


def cmd_export(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save, save_file

    from . import store

    def storable(dtype: torch.dtype) -> bool:
        try:
            save({"x": torch.zeros(1, dtype=dtype)})
            return True
        except (KeyError, ValueError, TypeError):
            return False

    uri = _resolve(args.target)
    sd = store.read_state_dict(uri, args.version, storage_options=_opts(uri), names="*")  # flat, trees too
    kinds = {t.dtype: storable(t.dtype) for t in sd.values()}
    unsupported = [f"{printable(name)} ({t.dtype})" for name, t in sd.items() if not kinds[t.dtype]]
    if unsupported:
        raise ValueError(
            f"safetensors cannot store {', '.join(unsupported[:5])}; export the other tensors "
            f"with mlflow_lance.load_state_dict() and safetensors yourself, or load these with it"
        )
    seen: dict[int, str] = {}
    out = {}
    with _bar(args, len(sd), "tensor", "export") as bar:
        for name, t in sd.items():  # safetensors stores shared tensors once only if told; copy ties
            out[name] = t.clone() if id(t) in seen else t.contiguous()
            seen[id(t)] = name
            bar.update(1)
    save_file(out, args.output, metadata={"mlflow_lance.source": uri, "mlflow_lance.tensors": str(len(out))})
    text = f"wrote {len(out)} tensors to {printable(args.output)}"
    _emit(args, {"output": args.output, "tensors": len(out)}, text)
    return EXIT_OK


def cmd_bundle(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from .bundle import bundle_model
    from .lifecycle import not_found

    try:
        out = bundle_model(args.model_uri, args.output)
    except MlflowException as err:  # the registry or the artifact store refused the URI
        raise (LookupError if not_found(err) else ValueError)(str(err)) from None
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
    text = (
        f"bundled {printable(args.model_uri)} into {printable(out)} ({size:,} bytes; it loads with no tracking server)"
    )
    _emit(args, {"model_uri": args.model_uri, "output": out, "bytes": size}, text)
    return EXIT_OK


def _read_checkpoint(path: str) -> dict:
    """The state dict in the safetensors or torch file ``path``; FileNotFoundError if there is
    none, ValueError naming the file and what is wrong with it for anything else."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not stat.S_ISREG(mode):  # checked before opening: a FIFO would block the open
        raise ValueError(f"{path} is not a regular file (a directory, FIFO, socket or device)")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from None
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused it ({_unpickling_detail(err)}); "
            f"import loads only tensors and plain containers and never runs pickled "
            f"code: convert the checkpoint to safetensors where it was made"
        ) from None
    except OSError:  # the file could not be read (permissions, I/O): exit 2 with the OS's words
        raise
    except Exception as err:  # noqa: BLE001 (anything torch's parser meets in the file is about the file)
        raise ValueError(f"{path} is not a readable torch checkpoint: {type(err).__name__}: {err}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _unpickling_detail(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler objected to, without its advice to retry with
    ``weights_only=False`` (which would run the file's code)."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    detail = [ln for ln in lines if ln and "weights_only" not in ln and "Weights only" not in ln]
    return " ".join(detail) or "not a weights-only checkpoint"


def cmd_import(args: argparse.Namespace) -> int:
    from . import store, writer

    uri = _resolve(args.target)
    try:
        sd = writer.prepare(_read_checkpoint(args.input))
    except TypeError as err:  # the file holds what cannot be stored: bad input (exit 2), not a bug
        raise ValueError(f"{args.input}: {err}") from None
    with _bar(args, 1, "version", "import") as bar:
        info = store.save_state_dict(
            sd,
            uri,
            message=args.message or f"imported from {os.path.basename(args.input)}",
            storage_options=_opts(uri),
            compression=args.compression,
        )
        bar.update(1)
    _emit(
        args,
        asdict(info),
        f"version {info.version}: {info.num_tensors} tensors, {len(info.changed)} changed, "
        f"{info.bytes_written:,} bytes written",
    )
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    from .registry import sync

    _target_or_all(args)
    reports = sync(args.target, all=args.all)
    _emit(args, [asdict(r) for r in reports], "\n".join(map(_sync_line, reports)) or "nothing to sync")
    return EXIT_OK


def _sync_line(r: SyncReport) -> str:
    if r.skipped:
        return f"{printable(r.dataset)}: skipped: {printable(r.skipped)}"
    model = ""
    if r.registered_model:
        model = f"{printable(r.registered_model)}: {len(r.model_versions)} model versions, "
    return (
        f"{printable(r.dataset)}: {model}{r.runs} runs; pinned {r.pinned or 'nothing new'}; "
        f"unpinned {r.unpinned or 'nothing'}"
    )


# --------------------------------------------------------------------------- wiring


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose error messages (which quote the arguments) are escaped."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {printable(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command and option (its subparsers are of the same class)."""
    parser = _Parser(prog="mlflow-lance", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog="example:\n  " + EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
        p.set_defaults(fn=fn)
        return p

    target = {"help": "dataset URI or registered model name"}
    p = add("versions", cmd_versions, "list versions: time, tensors, changed, bytes written, run, tags")
    p.add_argument("target", **target)
    p = add("diff", cmd_diff, "tensors added, removed and changed between two versions")
    p.add_argument("target", **target)
    p.add_argument("a", type=_version, help="version number or tag")
    p.add_argument("b", nargs="?", type=_version, help="version number or tag (default: latest)")
    p = add("tag", cmd_tag, "point a tag at a version (tagged versions survive gc), or --delete it")
    p.add_argument("target", **target)
    p.add_argument("name")
    p.add_argument("version", nargs="?", type=_version_number)
    p.add_argument("--delete", action="store_true")
    p = add("verify", cmd_verify, "recompute every content hash of a version; exit 1 on any mismatch")
    p.add_argument("target", **target)
    p.add_argument("--version", type=_version, help="version number or tag (default: latest)")
    p = add(
        "gc",
        cmd_gc,
        "remove the versions nothing references (MLflow decides for datasets it logged to) and the files only they use",
    )
    p.add_argument("target", nargs="?", **target)
    p.add_argument(
        "--all", action="store_true", help="every dataset under the Lance roots and every registered model's"
    )
    p.add_argument(
        "--keep-last",
        type=int,
        help="also keep the N newest versions (required for datasets MLflow "
        "never wrote to, unless --older-than-days is given)",
    )
    p.add_argument("--older-than-days", type=_duration("days"), help="also remove versions older than this")
    p.add_argument(
        "--grace-minutes",
        type=_duration("minutes"),
        default=timedelta(minutes=30),
        help="keep versions superseded less than this long ago (default 30)",
    )
    p.add_argument("--dry-run", action="store_true")
    p.add_argument(
        "--assume-logged-here",
        action="store_true",
        help="trust that this tracking server logged the dataset even though it knows none of its "
        "experiments, runs or models (they were all purged)",
    )
    p = add("export", cmd_export, "write a version to a safetensors file")
    p.add_argument("target", **target)
    p.add_argument("output")
    p.add_argument("--version", type=_version, help="version number or tag (default: latest)")
    p = add("import", cmd_import, "save a safetensors or torch .pt/.bin state dict as a new version")
    p.add_argument("target", **target)
    p.add_argument("input")
    p.add_argument("-m", "--message")
    p.add_argument(
        "--compression",
        choices=("none", "zstd", "auto"),
        help="for a new dataset (fixed per dataset): auto = byte-grouped zstd per tensor, smaller "
        "for object storage or an MLflow proxy, slower to load locally (default: raw, or what the "
        "dataset was created with)",
    )
    p = add("bundle", cmd_bundle, "write a model directory that holds its own weights (deploy it anywhere)")
    p.add_argument("model_uri", help="models:/..., runs:/... or a local model directory")
    p.add_argument("output", help="a new directory")
    p = add("sync", cmd_sync, "reconcile pins, UI tags, history and sidecars with what MLflow references")
    p.add_argument("target", nargs="?", **target)
    p.add_argument("--all", action="store_true", help="every registered model and every dataset under the Lance roots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (see the module docstring). Errors go to stderr, escaped."""
    args = build_parser().parse_args(argv)
    from . import store

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.fn(args)
        except (FileNotFoundError, store.VersionNotFoundError) as err:
            return _fail(args, err, EXIT_NOT_FOUND)
        except (KeyError, IndexError):  # lookups that failed inside the code: a bug, not "not found"
            return _internal(args)
        except LookupError as err:  # the registry has no such model
            return _fail(args, err, EXIT_NOT_FOUND)
        except (ValueError, OSError) as err:
            # bad arguments or input: WeightsError and CorruptionError (a corrupt or crafted
            # dataset) are ValueErrors; OSError: storage that refused or cannot be reached.
            # A TypeError is a bug (exit 4 below): input checks that raise one are turned
            # into ValueErrors where the command reads its input (cmd_import)
            return _fail(args, err, EXIT_USAGE)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException:  # noqa: BLE001 (a bug, or a Rust panic (a BaseException): exit 4)
            return _internal(args)


def _fail(args: argparse.Namespace, err: BaseException, code: int) -> int:
    """Report ``err`` (escaped: its message may quote a dataset) on stderr; return ``code``."""
    _say(f"mlflow-lance {args.command}: {printable(err) or type(err).__name__}", sys.stderr)
    return code


def _internal(args: argparse.Namespace) -> int:
    """Report an unexpected exception (being handled) with its traceback, escaped: exit code 4."""
    _say(traceback.format_exc().rstrip("\n"), sys.stderr)
    _say(
        f"mlflow-lance {args.command}: internal error (exit code {EXIT_INTERNAL}); please report "
        f"it with the traceback above",
        sys.stderr,
    )
    return EXIT_INTERNAL


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the duration of a command: the warning, escaped, on stderr."""
    _say(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"), sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
