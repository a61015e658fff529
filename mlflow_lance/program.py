"""A model's architecture as a ``torch.export`` program without its weights (``pt2``).

``dump`` serializes an ``ExportedProgram`` with torch's own JSON serializer, asking it for
neither the state dict, nor the constants, nor the example inputs (the three parts torch
pickles). The file is a zip (stored, never compressed) of:

- ``program.json``: torch's serialized program (graph, signature, shapes), plain JSON;
- ``meta.json``: which state-dict names the program takes as parameters (with
  ``requires_grad``) and buffers, the device it was exported on, and its constants (tensors
  the graph holds that are not in the state dict: non-persistent buffers, lifted tensor
  constants) as dtype, shape and the member that holds their raw bytes;
- ``constants/<i>``: those raw bytes.

The weights go to Lance like any version's. ``load`` gives the program the weights read
from Lance and returns ``ExportedProgram.module()``, as ``mlflow.pytorch`` returns for its
``pt2`` models. Nothing on that path unpickles: the program and its metadata are JSON, and
the tensors are raw bytes.

A program is not inert data, though: torch's deserializer resolves call targets by name,
parses shape expressions with sympy (which evaluates them) and compiles guard expressions
into Python. So a program from someone else (``untrusted``: pickle refused) is checked
first: every call target is an operator of ``torch.ops`` (or a plain arithmetic operator),
every shape expression a sympy tree of known classes, every guard a comparison of input
sizes; anything else is refused before torch sees it.

Nothing here knows about Lance or MLflow.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import compat
from .errors import CorruptionError, WeightsError
from .tensors import DTYPES, dtype_from_name, dtype_name, stored_nbytes, tensor_bytes

PROGRAM_FILE = "exported_program.zip"
_FORMAT = "mlflow_lance.exported_program"
_FORMAT_VERSION = 1
_PROGRAM = "program.json"
_META = "meta.json"
_MAX_MEMBERS = 1 << 16
_MAX_DEPTH = 200  # nesting of program.json (torch's own programs stay far below)

# Names a shape expression may use: torch's sympy functions and sympy's own classes.
_SYMPY_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Mul",
        "Add",
        "Pow",
        "Min",
        "Max",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "floor",
        "ceiling",
        "oo",
        "zoo",
        "nan",
        "true",
        "false",
        "Infinity",
        "NegativeInfinity",
        "One",
        "Zero",
        "NegativeOne",
        "Half",
        "BooleanTrue",
        "BooleanFalse",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "IntTrueDiv",
        "FloatTrueDiv",
        "LShift",
        "RShift",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "FloatPow",
        "PowByNatural",
        "Identity",
    }
)
_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]{0,12}")
_SYMPY_KEYWORDS = frozenset({"positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite"})
_OPERATORS = frozenset(
    {
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "pos",
        "abs",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "not_",
        "invert",
        "lshift",
        "rshift",
    }
)
_TORCH_SYM_FUNCTIONS = frozenset(
    {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum", "_sym_sqrt"}
)
_GUARD_ATTRS = frozenset({"size", "stride", "storage_offset", "dim", "numel", "isnan", "inf"})
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def tensor_inputs(input_example: Any) -> tuple[torch.Tensor, ...] | None:
    """The input example as the positional tensors ``torch.export`` takes.

    Args:
        input_example: what ``log_model`` was given.

    Returns:
        One tensor per positional argument for an array or tensor, or a tuple or list of
        them (what ``mlflow.pytorch`` accepts for ``pt2``); None for anything else.
    """
    values = input_example if isinstance(input_example, (tuple, list)) else (input_example,)
    if not values or not all(isinstance(v, (np.ndarray, torch.Tensor)) for v in values):
        return None
    return tuple(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values)


def export(
    module: torch.nn.Module, inputs: Sequence[torch.Tensor], signature: Any = None, *, eval_mode: bool = False
) -> Any:
    """``torch.export.export`` of ``module`` on ``inputs``, with the dynamic dimensions
    ``mlflow.pytorch`` gives a ``pt2`` model: every dimension a tensor signature marks -1
    is ``Dim.AUTO`` (a size-1 dimension then stays static). Without a tensor signature for
    every input, the first dimension of each input is ``Dim.AUTO``.

    Args:
        module: the model, exported as it is (train or eval mode).
        inputs: one example tensor per positional argument of ``forward``.
        signature: an ``mlflow.models.ModelSignature``, or None.
        eval_mode: export the module in eval mode (each submodule's mode is restored after).

    Returns:
        The ``torch.export.ExportedProgram``.

    Raises:
        Exception: whatever ``torch.export.export`` raises for a model it cannot trace.
    """
    from torch.export import Dim

    specs = None
    if signature and signature.inputs is not None and signature.inputs.is_tensor_spec():
        specs = [list(spec.shape) for spec in signature.inputs.inputs]
        if len(specs) != len(inputs):
            specs = None
    dynamic_shapes = []
    for i, t in enumerate(inputs):
        dims = [d for d, size in enumerate(specs[i]) if size == -1] if specs else ([0] if t.dim() else [])
        dynamic_shapes.append({d: Dim.AUTO for d in dims} or None)
    modes = [(m, m.training) for m in module.modules()]
    if eval_mode:
        module.eval()
    try:
        return torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic_shapes)
    finally:
        for m, training in modes:
            m.training = training


def dump(program: Any, state_names: Sequence[str]) -> bytes:
    """The exported program without its weights: its JSON, which names are parameters and
    buffers, and its constants as raw bytes (see the module docstring).

    Args:
        program: a ``torch.export.ExportedProgram``.
        state_names: the names of the state dict stored in Lance; the program's parameters
            and buffers must be exactly these.

    Returns:
        The file's bytes.

    Raises:
        ValueError: the program holds something other than tensors (a custom or opaque
            object), a tensor of a dtype Lance does not store, or its state differs from
            ``state_names``.
    """
    state = program.state_dict
    if set(state) != set(state_names):
        raise ValueError(
            f"the exported program's state ({sorted(set(state) ^ set(state_names))[:5]} differ) is not the "
            f"model's state dict"
        )
    artifact = compat.resolve("serialize")(
        program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
    )
    devices = {t.device.type for t in state.values()}
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "device": devices.pop() if len(devices) == 1 else "cpu",
        "parameters": {k: bool(v.requires_grad) for k, v in state.items() if isinstance(v, torch.nn.Parameter)},
        "buffers": [k for k, v in state.items() if not isinstance(v, torch.nn.Parameter)],
        "constants": {},
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(_PROGRAM, artifact.exported_program)
        for i, (name, value) in enumerate(program.constants.items()):
            if type(value) is not torch.Tensor or value.layout != torch.strided or value.dtype not in DTYPES.values():
                raise ValueError(
                    f"the exported program holds {name!r}, a {type(value).__name__}, which mlflow_lance does "
                    f"not store without pickle"
                )
            member = f"constants/{i}"
            meta["constants"][name] = {
                "dtype": dtype_name(value.dtype, key=name),
                "shape": list(value.shape),
                "member": member,
            }
            z.writestr(member, bytes(tensor_bytes(value)))
        z.writestr(_META, json.dumps(meta))
    return buf.getvalue()


def load(
    data: bytes,
    where: str,
    weights: Mapping[str, torch.Tensor],
    device: torch.device,
    *,
    untrusted: bool,
    strict: bool = True,
) -> torch.nn.Module:
    """The module of a program ``dump`` wrote, its parameters and buffers ``weights``.

    Args:
        data: the program file's bytes.
        where: the file, for errors.
        weights: the state dict read from Lance (tied names share one tensor, and keep
            sharing it as one Parameter).
        device: where the module runs; a program exported on another device is moved
            (``torch.export.passes.move_to_device_pass``).
        untrusted: check the program before torch deserializes it (see the module docstring).
        strict: refuse weights the program does not take.

    Returns:
        ``ExportedProgram.module()``: a ``torch.fx.GraphModule``.

    Raises:
        CorruptionError: the file is not such a program, or (untrusted) it names something
            other than torch's operators and shape arithmetic; nothing of it ran.
        WeightsError: the weights do not match the program's state.
    """
    meta, program, constants = _read(data, where)
    names = [*meta["parameters"], *meta["buffers"]]
    missing = [n for n in names if n not in weights]
    unexpected = [n for n in weights if n not in set(names)] if strict else []
    if missing or unexpected:
        raise WeightsError(
            f"the weights do not fit the program at {where}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if untrusted:
        check(program, where)
    state: dict[str, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    for name in names:
        t = weights[name].to(device)
        if name in meta["parameters"]:
            if id(weights[name]) not in made:
                made[id(weights[name])] = torch.nn.Parameter(t, requires_grad=meta["parameters"][name])
            t = made[id(weights[name])]
        state[name] = t
    try:
        artifact = compat.resolve("SerializedArtifact")(
            program, state, {k: v.to(device) for k, v in constants.items()}, b""
        )
        ep = compat.resolve("deserialize")(artifact)
        if torch.device(meta["device"]).type != device.type:
            from torch.export.passes import move_to_device_pass

            ep = move_to_device_pass(ep, device)
        return ep.module()
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 (torch's deserializer raises anything for a bad program)
        raise CorruptionError(
            f"{where} is not an exported program this torch ({torch.__version__}) can load "
            f"(saved with torch {meta.get('torch_version')!s:.40}): {type(err).__name__}: {str(err)[:300]}"
        ) from None


def _read(data: bytes, where: str) -> tuple[dict, bytes, dict[str, torch.Tensor]]:
    """(meta, program JSON, constants) of a program file, its structure checked."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise CorruptionError(f"{where} is not an mlflow_lance exported program (not a zip archive)") from None
    if len(infos) > _MAX_MEMBERS or any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise CorruptionError(f"{where} is not an mlflow_lance exported program (compressed or too many members)")
    members = {i.filename: i for i in infos}

    def member(name: str) -> bytes:
        if name not in members:
            raise CorruptionError(f"{where} has no member {name!r}: not an mlflow_lance exported program")
        try:
            return z.read(members[name])
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise CorruptionError(f"{where}: member {name!r} cannot be read ({err}); the file is damaged") from None

    try:
        meta = json.loads(member(_META))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptionError(f"{where}: {_META} is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CorruptionError(f"{where} is not an mlflow_lance exported program")
    if meta.get("version") != _FORMAT_VERSION:
        raise CorruptionError(
            f"{where} is version {str(meta.get('version'))[:20]} of the exported program format; this "
            f"mlflow_lance reads version {_FORMAT_VERSION}"
        )
    params, buffers, consts = meta.get("parameters"), meta.get("buffers"), meta.get("constants")
    if (
        not isinstance(params, dict)
        or not all(isinstance(k, str) and isinstance(v, bool) for k, v in params.items())
        or not isinstance(buffers, list)
        or not all(isinstance(b, str) for b in buffers)
        or not isinstance(consts, dict)
        or not isinstance(meta.get("device"), str)
        or not re.fullmatch(r"[a-z]{1,16}(:[0-9]{1,4})?", meta["device"])
    ):
        raise CorruptionError(f"{where}: {_META} is malformed")
    constants = {}
    for name, spec in consts.items():
        ok = (
            isinstance(spec, dict)
            and spec.get("dtype") in DTYPES
            and isinstance(spec.get("shape"), list)
            and len(spec["shape"]) <= 64
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 62 for s in spec["shape"])
            and isinstance(spec.get("member"), str)
        )
        if not ok:
            raise CorruptionError(f"{where}: constant {str(name)[:100]!r} in {_META} is malformed")
        raw = member(spec["member"])
        if len(raw) != stored_nbytes(spec["dtype"], spec["shape"]):
            raise CorruptionError(f"{where}: constant {name[:100]!r} holds {len(raw)} bytes, not what its shape needs")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        constants[name] = flat.view(dtype_from_name(spec["dtype"], key=name)).reshape(spec["shape"])
    return meta, member(_PROGRAM), constants


def check(program: bytes, where: str) -> None:
    """Refuse a program that names anything but torch's operators and shape arithmetic.

    Checked, before torch deserializes anything: the JSON nests at most ``_MAX_DEPTH``
    levels; every call target is ``torch.ops.<namespace>.<op>.<overload>`` (an operator
    registered with torch's dispatcher), one of torch's ``sym_*`` functions, a plain
    arithmetic ``_operator``, or a ``math`` function; every shape expression (which torch
    hands to ``sympy.sympify``, an ``eval``) is a tree of sympy's and torch's shape
    classes with integer, float, bool and symbol-name arguments; every guard (which torch
    compiles into Python) compares sizes of the inputs; no custom object is referenced; no
    input or output structure (a pytree spec) names a ``defaultdict`` factory or an enum,
    which torch's pytree imports by module name.

    Raises:
        CorruptionError: naming the first thing refused.
    """
    try:
        doc = json.loads(program)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptionError(f"{where}: {_PROGRAM} is not JSON") from None
    if not isinstance(doc, dict):
        raise CorruptionError(f"{where}: {_PROGRAM} is not a program")

    def refuse(what: str) -> CorruptionError:
        return CorruptionError(
            f"refusing the exported program at {where}: {what}. A program from someone else (pickle "
            f"refused) may name only torch's operators and shape arithmetic; nothing of it was run"
        )

    stack: list[tuple[Any, str | None, int]] = [(doc, None, 0)]
    while stack:
        node, key, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise refuse(f"it nests deeper than {_MAX_DEPTH} levels")
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "target" and isinstance(v, str):
                    _check_target(v, refuse)
                elif k == "expr_str" and isinstance(v, str):
                    _check_sympy(v, refuse)
                elif k in ("in_spec", "out_spec") and isinstance(v, str):
                    _check_treespec(v, refuse)
                elif k in ("as_custom_obj", "as_custom_objs", "custom_obj") and v:
                    raise refuse("it references a custom object")
                stack.append((v, k, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, key, depth + 1) for v in node)
    for name in doc.get("range_constraints") or {}:
        if not _SYMBOL.fullmatch(str(name)):
            raise refuse(f"shape symbol {str(name)[:60]!r}")
    guards = doc.get("guards_code") or []
    if not isinstance(guards, list):
        raise refuse("its guards are not a list")
    for guard in guards:
        _check_guard(guard, refuse)


def _check_target(target: str, refuse: Any) -> None:
    parts = target.split(".")
    ok = (
        (
            len(parts) in (4, 5)
            and parts[:2] == ["torch", "ops"]
            and all(re.fullmatch(_IDENT, p) for p in parts[2:])
            and not any(p.startswith("__") for p in parts)
        )
        or (len(parts) == 2 and parts[0] == "torch" and parts[1] in _TORCH_SYM_FUNCTIONS)
        or (len(parts) == 2 and parts[0] == "_operator" and parts[1] in _OPERATORS)
        or (len(parts) == 2 and parts[0] == "math" and re.fullmatch(r"[a-z][a-z0-9]*", parts[1]) is not None)
    )
    if not ok:
        raise refuse(f"call target {target[:100]!r}")
    if parts[0] == "torch" and parts[1] == "ops":
        resolved: Any = torch.ops
        for p in parts[2:]:
            try:
                resolved = getattr(resolved, p)
            except (AttributeError, RuntimeError):
                raise refuse(f"call target {target[:100]!r}, which is no operator this torch has") from None
        operators = tuple(compat.resolve(n) for n in ("OpOverload", "OpOverloadPacket", "HigherOrderOperator"))
        if not isinstance(resolved, operators):
            raise refuse(f"call target {target[:100]!r}, which is not an operator")


def _check_treespec(spec: str, refuse: Any) -> None:
    try:
        doc = json.loads(spec)
    except (ValueError, RecursionError):
        raise refuse("an input or output structure that is not JSON") from None
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "collections.defaultdict" or "__enum__" in node:
                raise refuse("an input or output structure that names a module to import")
            context = node.get("context")
            if isinstance(context, str):
                try:
                    stack.append(json.loads(context))
                except (ValueError, RecursionError):
                    raise refuse("an input or output structure that is not JSON") from None
            stack.extend(v for k, v in node.items() if k != "context")
        elif isinstance(node, list):
            stack.extend(node)


def _check_sympy(expr: str, refuse: Any) -> None:
    try:
        tree = ast.parse(expr, mode="eval") if len(expr) <= 1 << 16 else None
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        tree = None
    if tree is None:
        raise refuse(f"shape expression {expr[:100]!r}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES
        elif isinstance(node, ast.keyword):
            ok = (
                node.arg in _SYMPY_KEYWORDS
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, bool)
            )
        elif isinstance(node, ast.Name):
            ok = node.id in _SYMPY_NAMES or node.id in ("True", "False")
        elif isinstance(node, ast.Constant):
            value = node.value
            ok = isinstance(value, (int, float, bool)) or (isinstance(value, str) and bool(_SYMBOL.fullmatch(value)))
        else:
            ok = isinstance(
                node, (ast.Expression, ast.Load, ast.UnaryOp, ast.USub, ast.UAdd, ast.BinOp, ast.Add, ast.Sub, ast.Mult)
            )
        if not ok:
            raise refuse(f"shape expression {expr[:100]!r}")


def _check_guard(guard: object, refuse: Any) -> None:
    if not isinstance(guard, str) or len(guard) > 4096 or "\n" in guard or '"' in guard or "\\" in guard:
        raise refuse("a guard that is not a one-line expression")
    try:
        tree = ast.parse(guard, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise refuse(f"guard {guard[:100]!r}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            ok = node.id in ("L", "math", "True", "False") or node.id in _SYMPY_NAMES
        elif isinstance(node, ast.Attribute):
            ok = node.attr in _GUARD_ATTRS
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Attribute) or (
                isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES
            )
        elif isinstance(node, ast.Constant):
            value = node.value
            ok = isinstance(value, (int, float, bool)) or (
                isinstance(value, str) and re.fullmatch(_IDENT, value) is not None
            )
        else:
            ok = isinstance(
                node,
                (
                    ast.Expression,
                    ast.Load,
                    ast.Subscript,
                    ast.Compare,
                    ast.BoolOp,
                    ast.UnaryOp,
                    ast.BinOp,
                    ast.cmpop,
                    ast.boolop,
                    ast.unaryop,
                    ast.operator,
                ),
            )
        if not ok:
            raise refuse(f"guard {guard[:100]!r}")
