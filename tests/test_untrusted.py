"""Inputs from someone else: crafted datasets, version indexes, commits and model directories.

Every case is built here, at test time, from a real dataset or model directory (no checked-in
binaries), and must end in a clear error or in correct data: never a crash, a hang, a read
outside the dataset, uninitialised bytes or code execution (a marker file proves that no
command ran). Each case is counted in test-artifacts/untrusted.json for the README.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import lance
import pytest
import torch
import yaml
from corpus import OUTCOMES, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lance.fragment import DataFile, write_fragments

import mlflow_lance as ml
from conftest import in_subprocess, raw
from mlflow_lance import format, store, tensors
from mlflow_lance.cli import main as cli
from mlflow_lance.tensors import hash_bytes, rows_batch

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- building inputs


def weights() -> dict[str, torch.Tensor]:
    """A small state dict with a tie (head is emb), two dtypes and a 0-d tensor."""
    emb = torch.arange(64, dtype=torch.float32).reshape(16, 4) / 7
    return {"emb": emb, "bias": torch.arange(8, dtype=torch.int64), "scale": torch.tensor(2.5), "head": emb}


def expected() -> dict[str, bytes]:
    return {k: raw(v) for k, v in weights().items()}


@pytest.fixture
def uri(tmp_path: Path) -> Path:
    path = tmp_path / "w.lance"
    ml.save_state_dict(weights(), path)
    return path


def index_of(uri: Path) -> Path:
    return uri / "_mlflow_lance" / "index" / f"{lance.dataset(str(uri)).version}.json"


def data_file(uri: Path, name: str) -> Path:
    """The data file holding tensor ``name``'s first row."""
    ds = lance.dataset(str(uri))
    table = ds.to_table(columns=["name"], with_row_address=True).to_pylist()
    fid = next(r["_rowaddr"] >> 32 for r in table if r["name"] == name)
    frag = next(f for f in ds.get_fragments() if f.fragment_id == fid)
    return uri / "data" / frag.metadata.files[0].path


def row(name: str, payload: bytes, dtype: str = "float32", shape: list | None = None, **over) -> tuple[dict, bytes]:
    """One crafted row: consistent by default, with any column overridden."""
    size = {"float32": 4, "int64": 8, "int32": 4}[dtype]
    meta = {
        "name": name,
        "chunk": 0,
        "offset": 0,
        "nbytes": len(payload),
        "dtype": dtype,
        "shape": [len(payload) // size] if shape is None else shape,
        "hash": hash_bytes(payload),
        "alias": None,
    }
    meta.update(over)
    return meta, payload


def base_rows() -> list[tuple[dict, bytes]]:
    sd = weights()
    return [
        row("emb", raw(sd["emb"]), shape=[16, 4]),
        row("bias", raw(sd["bias"]), "int64"),
        row("scale", raw(sd["scale"]), shape=[]),
        row("head", b"", shape=[16, 4], nbytes=256, alias="emb"),
    ]


def commit(uri: Path, fragments: list, props: dict[str, str]) -> int:
    ds = lance.dataset(str(uri))
    txn = lance.Transaction(
        ds.version, lance.LanceOperation.Overwrite(ds.schema, fragments), transaction_properties=props
    )
    return lance.LanceDataset.commit(str(uri), txn).version


def summary(metas: list[dict], digest: bool = True) -> dict[str, str]:
    props = {
        "mlflow_lance.tensors": str(len({m["name"] for m in metas})),
        "mlflow_lance.format": "1",
        "mlflow_lance.bytes": str(sum(m["nbytes"] for m in metas if m["alias"] is None)),
    }
    if digest:  # an attacker who writes the commit can write a matching digest
        props["mlflow_lance.rows"] = format.rows_digest(metas)
    return props


def craft(uri: Path, rows: list[tuple[dict, bytes]], props: dict | None = None) -> int:
    """A new version of ``uri`` whose rows are exactly ``rows`` (one data file each)."""
    ds = lance.dataset(str(uri))
    batches = [rows_batch(ds.schema, meta, memoryview(payload)) for meta, payload in rows]
    import pyarrow as pa

    frags = write_fragments(
        pa.RecordBatchReader.from_batches(ds.schema, iter(batches)),
        str(uri),
        schema=ds.schema,
        mode="append",
        max_rows_per_file=1,
        data_storage_version="2.0",
    )
    return commit(uri, frags, summary([m for m, _ in rows]) if props is None else props)


class Holder(torch.nn.Module):
    """A module whose buffers are the tensors of a state dict, zeroed: the load_into target."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in sd.items():
            self.register_buffer(k, torch.zeros_like(v))


def outcome(uri: Path, expect: dict[str, bytes] | None, kind: str, tmp_path: Path) -> str:
    """Load ``uri`` every way there is (load_state_dict and load_into, each with and without
    verify; verify(); the CLI's export) and say how they ended: "refused" (a clear error, the
    target untouched) or "correct" (exactly ``expect``) when every way ended the same, else
    the list of each way's ending ("accepted" where a load returned data and ``expect`` is
    None). Wrong bytes or a half-updated target fail here."""
    results = []
    for verify in (False, True):
        try:
            sd = ml.load_state_dict(uri, verify=verify)
        except ml.WeightsError as err:
            assert str(uri) in str(err) or "data file" in str(err), err
            results.append("refused")
        else:
            if expect is not None:
                assert {k: raw(v) for k, v in sd.items()} == expect, f"{kind}: wrong bytes came back"
            results.append("correct" if expect is not None else "accepted")
    holder = Holder(weights())
    before = {k: raw(v) for k, v in holder.state_dict().items()}
    for verify in (False, True):
        try:
            ml.load_into(holder, uri, verify=verify)
        except (ml.WeightsError, RuntimeError) as err:
            assert {k: raw(v) for k, v in holder.state_dict().items()} == before, f"{kind}: half-updated"
            assert str(uri) in str(err) or "data file" in str(err), err
            results.append("refused")
        else:
            if expect is not None:
                assert {k: raw(v) for k, v in holder.state_dict().items()} == expect, f"{kind}: wrong bytes loaded"
            results.append("correct" if expect is not None else "accepted")
    report = ml.verify(uri)
    results.append(("correct" if expect is not None else "accepted") if report.ok else "refused")
    out = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}.safetensors"
    code = cli(["export", str(uri), str(out)])
    assert code in (0, 2), f"{kind}: export exited {code}"
    assert (code == 0) == out.exists()
    results.append(("correct" if expect is not None else "accepted") if code == 0 else "refused")
    if len(set(results)) != 1 or results[0] == "accepted":  # the caller's comparison fails, naming each way
        return f"{kind}: load_state_dict, verify=True, load_into, verify=True, verify(), export: {results}"
    record(kind, results[0])
    return results[0]


def test_outcome_reports_what_happened_not_what_was_expected(uri, tmp_path):
    """outcome() observes: an intact dataset comes back "correct" and a crafted one "refused",
    whatever the caller expected; a caller expecting the wrong ending fails."""
    assert outcome(uri, expected(), "check", tmp_path) == "correct"
    assert outcome(uri, None, "check", tmp_path) != "refused"  # accepted, though refusal was expected
    craft(uri, base_rows() + [row("x", b"", shape=[16, 4], nbytes=256, alias="x")])
    assert outcome(uri, expected(), "check", tmp_path) == "refused"
    OUTCOMES.pop(("check", "correct"))
    OUTCOMES.pop(("check", "refused"))


# --------------------------------------------------------------------------- 6: a silent object store


@pytest.fixture(scope="module", autouse=True)
def silent_store():
    """An S3 endpoint that accepts connections and never answers, probed by two background
    processes from the module's first test on (so the wait overlaps the other tests): one
    with the default limits, one overriding them."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    code = """
        import json, sys, time
        import mlflow_lance as ml
        opts = {"aws_endpoint": "http://127.0.0.1:PORT", "allow_http": "true", "aws_access_key_id": "a",
                "aws_secret_access_key": "b", "aws_region": "us-east-1", **json.loads(sys.argv[1])}
        t0 = time.monotonic()
        try:
            ml.load_state_dict("s3://b/w.lance", storage_options=opts)
            err = None
        except ConnectionError as e:
            err = str(e)
        print(json.dumps({"error": err, "seconds": time.monotonic() - t0}))
    """.replace("PORT", str(port))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), opts],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        for name, opts in (("default", "{}"), ("override", '{"timeout": "1s", "client_max_retries": "0"}'))
    }
    yield procs
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    server.close()


# --------------------------------------------------------------------------- 1: factories


FACTORY_ATTACKS = [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:run", {"args": ["touch", "{marker}"]}),
    ("builtins:exec", {"source": "open({marker!r}, 'w')"}),
    ("pickle:loads", {"data": "x"}),
    ("antigravity:geohash", {}),  # a module nothing imported: importing it runs code
    ("shipped_zoo:Evil", {}),  # code the model directory ships, writing the marker on import
    ("torch.nn:Linear.__init__", {}),
]


@pytest.fixture(scope="module")
def factory_model(tmp_path_factory) -> Path:
    """A real model directory logged with a factory the environment vouches for."""
    path = tmp_path_factory.mktemp("factory") / "model"
    torch.manual_seed(0)
    ml.save_model(
        torch.nn.Linear(4, 2),
        str(path),
        model_factory="torch.nn:Linear",
        factory_kwargs={"in_features": 4, "out_features": 2},
    )
    return path


def with_factory(model: Path, dst: Path, factory: str, kwargs: dict, marker: Path, code: dict | None = None) -> Path:
    """A copy of ``model`` whose MLmodel names ``factory`` (and ships ``code`` files)."""
    shutil.copytree(model, dst)
    mlmodel = yaml.safe_load((dst / "MLmodel").read_text())
    conf = mlmodel["flavors"]["mlflow_lance"]
    conf["model_factory"] = factory

    def fill(v):
        if isinstance(v, str):
            return v.format(marker=str(marker))
        return [fill(x) for x in v] if isinstance(v, list) else v

    conf["factory_kwargs"] = {k: fill(v) for k, v in kwargs.items()}
    if code:
        for rel, text in code.items():
            (dst / "code" / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / "code" / rel).write_text(text.format(marker=str(marker)))
        conf["code"] = mlmodel["flavors"]["python_function"]["code"] = "code"
    (dst / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return dst


EVIL = "open({marker!r}, 'w').write('ran')\nimport torch\nclass Evil(torch.nn.Module):\n    pass\n"


def test_1_a_factory_the_environment_does_not_vouch_for_never_runs(factory_model, tmp_path, monkeypatch):
    loaded = ml.load_model(str(factory_model), allow_pickle=False)  # the vouched-for original
    assert isinstance(loaded, torch.nn.Linear)
    record("1 factory", "correct")
    marker = tmp_path / "marker"
    dirs = []
    for i, (factory, kwargs) in enumerate(FACTORY_ATTACKS):
        code = {"shipped_zoo.py": EVIL} if factory.startswith("shipped_zoo") else None
        d = with_factory(factory_model, tmp_path / f"m{i}", factory, kwargs, marker, code)
        dirs.append(str(d))
        with pytest.raises(PermissionError, match="mlflow_lance.factories.*Nothing was imported or run"):
            ml.load_model(str(d), allow_pickle=False)
        monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        with pytest.raises(PermissionError, match=factory.replace(".", r"\.")):
            ml.load_model(str(d))
        monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
        assert not marker.exists(), f"{factory} ran"
        assert "antigravity" not in sys.modules and "shipped_zoo" not in sys.modules
        record("1 factory", "refused")
    # the same directories through pyfunc, as `mlflow models serve` would load them
    got = in_subprocess(
        f"""
        import json, mlflow.pyfunc
        out = []
        for d in {dirs!r}:
            try:
                mlflow.pyfunc.load_model(d)
                out.append("loaded")
            except PermissionError as e:
                out.append("refused")
        print(json.dumps(out))
    """,
        env={"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"},
    )
    assert got == ["refused"] * len(dirs)
    assert not marker.exists()
    OUTCOMES[("1 factory (pyfunc)", "refused")] += len(dirs)


def test_1_a_factory_registered_by_an_installed_package_loads(factory_model, tmp_path, monkeypatch):
    """The trust rule's positive case: an entry point in group mlflow_lance.factories, from a
    real (if tiny) installed distribution; and code the model ships cannot shadow it."""
    site = tmp_path / "site"
    (site / "vouched_models").mkdir(parents=True)
    (site / "vouched_models" / "__init__.py").write_text(
        "import torch\n\ndef linear(n: int) -> torch.nn.Module:\n    return torch.nn.Linear(n, 2)\n"
    )
    info = site / "vouched_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vouched-models\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mlflow_lance.factories]\nlinear = vouched_models:linear\n")
    monkeypatch.syspath_prepend(str(site))
    model = with_factory(factory_model, tmp_path / "ok", "vouched_models:linear", {"n": 4}, tmp_path / "unused")
    loaded = ml.load_model(str(model), allow_pickle=False)
    assert torch.equal(loaded.weight, ml.load_model(str(factory_model), allow_pickle=False).weight)
    record("1 factory", "correct")
    marker = tmp_path / "marker"
    shadow = {"vouched_models/__init__.py": "open({marker!r}, 'w')\nimport torch\nlinear = torch.nn.Linear\n"}
    evil = with_factory(factory_model, tmp_path / "shadow", "vouched_models:linear", {"n": 4}, marker, shadow)
    got = in_subprocess(
        f"""
        import json, mlflow.pyfunc
        try:
            mlflow.pyfunc.load_model({str(evil)!r})  # pyfunc puts the model's code/ first on sys.path
            print(json.dumps("loaded"))
        except PermissionError:
            print(json.dumps("refused"))
    """,
        env={
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
            "PYTHONPATH": os.pathsep.join([str(site), str(HERE.parent)]),
        },
    )
    assert got == "refused" and not marker.exists()
    record("1 factory", "refused")


# --------------------------------------------------------------------------- 2: ties


TIE_ATTACKS = {
    "tied to itself": {"alias": "x"},
    "tied to a missing tensor": {"alias": "nowhere"},
    "tied to a tie": {"alias": "head"},
    "tied to another shape": {"alias": "emb", "shape": [8, 8]},
    "tie with a payload": {"alias": "emb", "payload": b"\x01" * 256},
}


@pytest.mark.parametrize("attack", sorted(TIE_ATTACKS))
def test_2_a_tie_that_points_nowhere_is_refused(uri, tmp_path, attack):
    over = dict(TIE_ATTACKS[attack])
    payload = over.pop("payload", b"")
    rows = base_rows() + [
        row("x", payload, shape=over.pop("shape", [16, 4]), nbytes=256, hash=hash_bytes(payload), **over)
    ]
    craft(uri, rows)
    assert outcome(uri, None, "2 tie", tmp_path) == "refused"


def test_2_a_model_directory_over_a_self_tie_loads_no_uninitialised_memory(tmp_path):
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(16, 4), str(path))
    inner = path / "data" / "weights.lance"
    version = craft(
        inner,
        [row("weight", b"", shape=[4, 16], nbytes=256, alias="weight"), row("bias", raw(torch.ones(4)))],
    )
    pointer = path / "data" / "lance.yaml"
    pointer.write_text(yaml.safe_dump({"lance_uri": "weights.lance", "lance_version": version}))
    for verify in (False, True):
        with pytest.raises(ml.CorruptionError, match="tied to itself"):
            ml.load_model(str(path), verify=verify)
    record("2 tie", "refused")


# --------------------------------------------------------------------------- 3: files outside


@pytest.fixture
def secret(tmp_path) -> Path:
    """A Lance data file outside the dataset, holding other weights (the 'credentials')."""
    other = tmp_path / "elsewhere.lance"
    ml.save_state_dict({"emb": torch.full((16, 4), 7.0)}, other)
    path = tmp_path / "secret.lance"
    shutil.copy(data_file(other, "emb"), path)
    return path


@pytest.mark.parametrize("where", ["../../secret.lance", "../secret.lance", "absolute", "sub/../../../secret.lance"])
@pytest.mark.parametrize("with_index", [True, False])
def test_3_a_manifest_path_out_of_the_dataset_is_refused(uri, secret, tmp_path, where, with_index):
    ds = lance.dataset(str(uri))
    index = json.loads(index_of(uri).read_text())
    emb = data_file(uri, "emb").name
    path = str(secret) if where == "absolute" else where
    frags = []
    for f in ds.get_fragments():
        meta = f.metadata
        old = meta.files[0]
        if old.path == emb:
            new = DataFile(
                path,
                old.fields,
                old.column_indices,
                old.file_major_version,
                old.file_minor_version,
                old.file_size_bytes,
            )
            meta = dataclasses.replace(meta, files=[new])
        frags.append(meta)
    txn = ds.read_transaction(ds.version)
    version = commit(uri, frags, dict(txn.transaction_properties))  # same rows, same digest
    if with_index:  # and a matching version index, so no Lance scan stands in the way
        index["fragments"] = [[fid, path if p == emb else p, n] for fid, p, n in index["fragments"]]
        index["version"] = version
        index_of(uri).write_text(json.dumps(index))
    assert outcome(uri, None, "3 outside", tmp_path) == "refused"
    with pytest.raises(ml.CorruptionError, match=r"not a file of the dataset's data/ directory"):
        ml.load_state_dict(uri)


@pytest.mark.parametrize("with_index", [True, False])
@pytest.mark.parametrize("link", ["data file", "data directory"])
def test_3_a_symlink_out_of_the_dataset_is_refused(uri, secret, tmp_path, link, with_index):
    if link == "data file":
        target = data_file(uri, "emb")
        target.unlink()
        target.symlink_to(secret)
    else:
        outside = tmp_path / "outside-data"
        shutil.copytree(uri / "data", outside)
        shutil.copy(secret, outside / data_file(uri, "emb").name)  # the same name, other bytes
        shutil.rmtree(uri / "data")
        (uri / "data").symlink_to(outside)
    if not with_index:
        index_of(uri).unlink()
    assert outcome(uri, None, "3 outside", tmp_path) == "refused"
    with pytest.raises(ml.CorruptionError, match="not a regular file" if link == "data file" else "not a directory"):
        ml.load_state_dict(uri)


# --------------------------------------------------------------------------- 4: lies


def lie_in_index(uri: Path, change) -> None:
    doc = json.loads(index_of(uri).read_text())
    change(doc["rows"])
    index_of(uri).write_text(json.dumps(doc))


def set_cells(row: int, **cells):
    """An index edit: set columns of one index row (name ... alias, position, stored)."""
    columns = [*tensors.META_COLUMNS, "position", "stored"]
    return lambda rows: [rows[row].__setitem__(columns.index(k), v) for k, v in cells.items()]


INDEX_LIES = {
    "dtype float32 -> int32": set_cells(0, dtype="int32"),
    "shape smaller than the bytes": set_cells(0, shape=[8]),
    "shape larger than the bytes": set_cells(0, shape=[32, 4]),
    "duplicate names": set_cells(1, name="emb"),
    "2 GiB over 64 stored bytes": set_cells(0, nbytes=2 << 30, shape=[512 << 20], stored=64),
    "stored size larger than the payload": set_cells(1, stored=4096),
}


@pytest.mark.parametrize("lie", sorted(INDEX_LIES))
def test_4_a_version_index_that_lies_is_not_believed(uri, tmp_path, lie):
    lie_in_index(uri, INDEX_LIES[lie])
    lied = index_of(uri).read_bytes()
    assert outcome(uri, expected(), "4 lies", tmp_path) == "correct"  # ignored: the rows are decoded
    assert index_of(uri).read_bytes() == lied  # and a read never rewrites the index


@pytest.mark.parametrize("lie", sorted(INDEX_LIES))
def test_4_an_index_and_a_commit_that_lie_together(uri, tmp_path, lie):
    """The attacker rewrote the commit too, with a digest that matches the lying index: the
    index then disagrees with itself (a float32 tie to an int32 tensor, ...) and the rows
    are asked, which disagree with the commit. A stored size is no part of the digest: a
    lie there is caught by the same check and the rows answer correctly."""
    doc = json.loads(index_of(uri).read_text())
    INDEX_LIES[lie](doc["rows"])
    ds = lance.dataset(str(uri))
    metas = [dict(zip(tensors.META_COLUMNS, r[: len(tensors.META_COLUMNS)], strict=True)) for r in doc["rows"]]
    doc["version"] = commit(uri, [f.metadata for f in ds.get_fragments()], summary(metas))
    index_of(uri).write_text(json.dumps(doc))
    correct = lie == "stored size larger than the payload"
    assert outcome(uri, expected() if correct else None, "4 lies", tmp_path) == ("correct" if correct else "refused")


ROW_LIES = {
    "shape smaller than the bytes": lambda: [row("emb", raw(weights()["emb"]), shape=[8])],
    "shape larger than the bytes": lambda: [row("emb", raw(weights()["emb"]), shape=[32, 4])],
    "nbytes larger than the payload": lambda: [row("emb", raw(weights()["emb"]), shape=[32, 4], nbytes=512)],
    "duplicate names": lambda: [row("emb", raw(torch.ones(4))), row("emb", raw(torch.zeros(4)))],
    "2 GiB over 64 stored bytes": lambda: [row("emb", b"\x00" * 64, shape=[512 << 20], nbytes=2 << 30)],
    "unknown dtype": lambda: [({**row("emb", b"\x00" * 64)[0], "dtype": "float128"}, b"\x00" * 64)],
    "negative dimension": lambda: [row("emb", b"", shape=[-4, 0])],
    "chunk offsets past the end": lambda: [row("emb", b"\x00" * 64, shape=[16], offset=32)],
    "chunk numbered 1": lambda: [row("emb", b"\x00" * 64, shape=[16], chunk=1)],
    "name with control characters": lambda: [row("emb\x1b[2J", b"\x00" * 64, shape=[16])],
}


@pytest.mark.parametrize("lie", sorted(ROW_LIES))
def test_4_rows_that_lie_are_refused_before_anything_is_allocated(uri, tmp_path, lie):
    craft(uri, ROW_LIES[lie]())
    assert outcome(uri, None, "4 lies", tmp_path) == "refused"


@pytest.mark.parametrize("ratio", ["default", "raised"])
@pytest.mark.parametrize("payload", ["a zstd frame of 64 bytes", "not a zstd frame"])
def test_4_a_compressed_row_claiming_more_than_its_frame_is_refused(tmp_path, payload, ratio, monkeypatch):
    """A chunk may claim at most MLFLOW_LANCE_MAX_ZSTD_RATIO times its stored bytes; with the
    limit raised, its frame must still hold exactly the bytes it claims."""
    import zstandard

    uri = tmp_path / "z.lance"
    ml.save_state_dict(weights(), uri, compression="zstd")
    assert {k: raw(v) for k, v in ml.load_state_dict(uri).items()} == expected()
    data = zstandard.ZstdCompressor().compress(b"\x00" * 64) if payload.startswith("a zstd") else b"\x01" * 64
    craft(uri, [row("emb", data, shape=[512 << 20], nbytes=2 << 30, hash=hash_bytes(b"\x00" * 64))])
    assert outcome(uri, None, "4 lies", tmp_path) == "refused"
    if ratio == "raised":
        monkeypatch.setenv("MLFLOW_LANCE_MAX_ZSTD_RATIO", str(1 << 40))
    why = "zstd frame.* records 2147483648 bytes" if ratio == "raised" else "claims 2147483648 bytes from .* 1024x"
    with pytest.raises(ml.CorruptionError, match=why):
        ml.load_state_dict(uri)


def test_4_rows_rewritten_after_their_commit_are_refused(uri, tmp_path):
    """A tamperer who rewrites the rows but keeps the commit's record (its digest)."""
    ds = lance.dataset(str(uri))
    props = dict(ds.read_transaction(ds.version).transaction_properties)
    rows = base_rows()
    rows[0] = row("emb", rows[0][1], "int32", shape=[16, 4])  # float32 -> int32, same bytes
    craft(uri, rows, props)
    assert outcome(uri, None, "4 lies", tmp_path) == "refused"


# --------------------------------------------------------------------------- 5: unparsable index


INDEX_GARBAGE = {
    "null": b"null",
    "empty list": b"[]",
    "a string": b'"rows"',
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "deep nesting in rows": b'{"index_format": 2, "rows": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "not UTF-8": b"\xff\xfe\x00garbage",
    "over the size limit": b" " * ((64 << 20) + 1) + b"{}",
    "rows of wrong types": None,  # filled from the real index below
}


@pytest.mark.parametrize("garbage", sorted(INDEX_GARBAGE))
def test_5_an_index_that_does_not_parse_is_ignored(uri, tmp_path, garbage):
    text = INDEX_GARBAGE[garbage]
    if text is None:
        doc = json.loads(index_of(uri).read_text())
        doc["rows"][0][5] = {"not": "a shape"}
        doc["rows"][1][2] = True
        text = json.dumps(doc).encode()
    index_of(uri).write_bytes(text)
    assert [v.version for v in ml.versions(uri)] == [1]
    assert outcome(uri, expected(), "5 index", tmp_path) == "correct"
    assert index_of(uri).read_bytes() == text  # a read never rewrites it


def test_5_an_index_that_is_a_link_or_fifo_is_ignored(uri, tmp_path):
    good = index_of(uri).read_bytes()
    (tmp_path / "elsewhere.json").write_bytes(good)
    index_of(uri).unlink()
    index_of(uri).symlink_to(tmp_path / "elsewhere.json")
    assert outcome(uri, expected(), "5 index", tmp_path) == "correct"
    index_of(uri).unlink()
    os.mkfifo(index_of(uri))
    got = in_subprocess(
        f"""
        import json, mlflow_lance as ml
        sd = ml.load_state_dict({str(uri)!r})
        print(json.dumps(sorted(sd)))
    """,
        timeout=60,
    )
    assert got == sorted(weights())
    record("5 index", "correct")


# --------------------------------------------------------------------------- 6: hangs


@pytest.mark.parametrize("with_index", [True, False])
def test_6_a_data_file_that_is_a_fifo_fails_instead_of_hanging(uri, with_index):
    target = data_file(uri, "bias")
    target.unlink()
    os.mkfifo(target)
    if not with_index:
        index_of(uri).unlink()
    got = in_subprocess(
        f"""
        import json, time, mlflow_lance as ml
        out = []
        for call in (lambda: ml.load_state_dict({str(uri)!r}), lambda: ml.verify({str(uri)!r})):
            t0 = time.monotonic()
            try:
                r = call()
                out.append(["ok" if getattr(r, "ok", True) else "problems", str(getattr(r, "problems", ""))])
            except ml.WeightsError as e:
                out.append(["error", str(e)])
        print(json.dumps(out))
    """,
        timeout=60,
    )
    (load, load_err), (check, check_detail) = got
    assert load == "error" and "not a regular file" in load_err and target.name in load_err
    assert check == "problems" and "not a regular file" in check_detail
    record("6 hang", "refused")


def test_6_a_silent_object_store_fails_within_the_documented_time(silent_store):
    """Started with the module (two background processes); checked here."""
    results = {}
    for name, proc in silent_store.items():
        out, _ = proc.communicate(timeout=120)
        results[name] = json.loads(out.strip().splitlines()[-1])
    assert results["default"]["error"] and "timed out" in results["default"]["error"]
    assert results["default"]["seconds"] < 90, results  # README: about 70 s by default
    assert results["override"]["error"] and results["override"]["seconds"] < 20, results
    record("6 hang", "refused")


# --------------------------------------------------------------------------- 7: files changed under a load


def test_7_verified_and_unmapped_loads_do_not_change_when_the_file_does(tmp_path):
    path = tmp_path / "model"
    torch.manual_seed(0)
    ml.save_model(torch.nn.Linear(64, 64), str(path))
    uri = path / "data" / "weights.lance"
    weight, bias = data_file(uri, "weight"), data_file(uri, "bias")
    got = in_subprocess(
        f"""
        import json, os, torch, mlflow_lance as ml
        ways = {{
            "verify=True": lambda: ml.load_state_dict({str(uri)!r}, verify=True),
            "load_model verify=True": lambda: ml.load_model({str(path)!r}, verify=True).state_dict(),
        }}
        loads = {{k: f() for k, f in ways.items()}}
        os.environ["MLFLOW_LANCE_MMAP"] = "0"
        loads["MLFLOW_LANCE_MMAP=0"] = ml.load_state_dict({str(uri)!r})
        before = {{k: {{n: t.clone() for n, t in sd.items()}} for k, sd in loads.items()}}
        with open({str(weight)!r}, "r+b") as f:  # written in place
            f.write(b"\\xff" * 4096)
        os.truncate({str(bias)!r}, 0)  # truncated
        same = {{k: all(torch.equal(sd[n], before[k][n]) for n in sd) for k, sd in loads.items()}}
        print(json.dumps(same))
    """,
        timeout=90,
    )
    assert got == {"verify=True": True, "load_model verify=True": True, "MLFLOW_LANCE_MMAP=0": True}
    OUTCOMES[("7 changed file", "correct")] += len(got)


# --------------------------------------------------------------------------- 9: commit properties


PROPERTY_LIES = {
    "tensors not an int": {"mlflow_lance.tensors": "abc"},
    "bytes negative": {"mlflow_lance.bytes": "-1"},
    "changed deeply nested": {"mlflow_lance.changed": "[" * 100_000 + "]" * 100_000},
    "changed not a list of names": {"mlflow_lance.changed": '{"a": 1}'},
    "properties not an object": {"mlflow_lance.properties": "[1, 2]"},
    "parent not a version": {"mlflow_lance.parent": "x"},
    "changed not JSON": {"mlflow_lance.changed": "[unterminated"},
}


@pytest.mark.parametrize("lie", sorted(PROPERTY_LIES))
def test_9_malformed_commit_properties_give_clear_errors_and_exit_codes(uri, capsys, lie):
    ds = lance.dataset(str(uri))
    props = {**ds.read_transaction(ds.version).transaction_properties, **PROPERTY_LIES[lie]}
    version = commit(uri, [f.metadata for f in ds.get_fragments()], props)
    key = next(iter(PROPERTY_LIES[lie]))
    with pytest.raises(ml.WeightsError, match=rf"version {version} of .* malformed commit property {key}"):
        ml.versions(uri)
    assert {k: raw(v) for k, v in ml.load_state_dict(uri).items()} == expected()  # weights still load
    capsys.readouterr()
    assert cli(["versions", str(uri)]) == 2
    assert key in capsys.readouterr().err
    assert cli(["verify", str(uri), "--json"]) == 1
    assert key in json.dumps(json.loads(capsys.readouterr().out)["problems"])
    record("9 properties", "refused")


def test_9_an_internal_error_has_its_own_exit_code(uri, capsys, monkeypatch):
    def broken(*args, **kwargs):
        return {}["missing"]  # a KeyError bug: not "not found"

    monkeypatch.setattr(store, "versions", broken)
    assert cli(["versions", str(uri)]) == 4
    assert "internal error" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli(["versions", str(uri / "nope.lance")]) == 3


# --------------------------------------------------------------------------- smells fixed alongside


def test_load_into_verify_checks_each_chunk_before_writing_it(uri):
    target = data_file(uri, "emb")
    data = bytearray(target.read_bytes())
    data[5] ^= 0xFF
    target.write_bytes(bytes(data))
    holder = Holder(weights())
    with pytest.raises(ml.CorruptionError, match="'emb'"):
        ml.load_into(holder, uri, verify=True)
    assert torch.count_nonzero(holder.emb) == 0  # not written: the hash was checked first


def test_save_model_leaves_nothing_when_the_weights_cannot_be_written(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the dataset should go")
    path = tmp_path / "model"
    with pytest.raises(OSError, match=rf"writing a new version to '{blocker}/w.lance' failed.*Nothing was committed"):
        ml.save_model(torch.nn.Linear(2, 2), str(path), lance_uri=str(blocker / "w.lance"))
    assert not path.exists()
    ml.save_model(torch.nn.Linear(2, 2), str(path), lance_uri=str(tmp_path / "w.lance"))  # the retry works
    assert ml.load_model(str(path)).weight.shape == (2, 2)


def test_load_model_leaves_no_temporary_directory(factory_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # pick up TMPDIR
    ml.load_model(factory_model.as_uri())
    assert not list(tmp_path.glob("mlflow_lance_*"))
    assert not list(Path(factory_model).rglob("*.tmp"))


# --------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "w.lance"
    ml.save_state_dict(weights(), path)
    return path


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=8)
    | st.sampled_from(["float32", "int32", "emb", "head", "bias", "scale", "../x"]),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)
COLUMN_VALUES = {
    "name": st.sampled_from(["emb", "bias", "scale", "head", "x", "", "emb\n"]),
    "chunk": st.integers(-2, 3),
    "offset": st.integers(-8, 600),
    "nbytes": st.sampled_from([0, 4, 8, 64, 256, 512, 2 << 30]),
    "dtype": st.sampled_from(["float32", "int32", "int64", "bool", "float128"]),
    "shape": st.lists(st.integers(-1, 70), max_size=3),
    "hash": st.sampled_from([hash_bytes(b""), "0" * 32]),
    "alias": st.sampled_from([None, "emb", "head", "x", "nowhere"]),
}


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # reproducible counts
@given(
    target=st.sampled_from(["index", "rows"]),
    edits=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(sorted(COLUMN_VALUES)), st.data()),
        min_size=1,
        max_size=3,
    ),
    payload_cut=st.sampled_from([None, 0, 1, 63]),
)
def test_fuzz_mutated_index_and_rows_never_load_unsafely(pristine, tmp_path_factory, target, edits, payload_cut):
    """The index mutated (must be ignored: correct data), or rows crafted in a new commit
    (must be refused, or return exactly their payloads; verify() OK implies a clean load)."""
    uri = tmp_path_factory.mktemp("fuzz") / "w.lance"
    shutil.copytree(pristine, uri)
    rows = [list(r) for r in base_rows()]
    if target == "index":  # the derived file only: must be ignored unless it still agrees
        doc = json.loads(index_of(uri).read_text())
        for i, column, data in edits:
            doc["rows"][i][tensors.META_COLUMNS.index(column)] = data.draw(st.one_of(COLUMN_VALUES[column], JSON))
        if payload_cut is not None:
            doc["rows"][0][-1] = payload_cut  # the stored size (the digest does not cover it)
        index_of(uri).write_text(json.dumps(doc))
        expect: dict[str, bytes] | None = expected()
    else:  # a crafted commit whose rows (and digest) say whatever the attacker wants
        for i, column, data in edits:
            rows[i][0] = {**rows[i][0], column: data.draw(COLUMN_VALUES[column])}
        if payload_cut is not None:
            rows[0][1] = rows[0][1][:payload_cut]
        craft(uri, [tuple(r) for r in rows])
        expect = None
    try:
        sd = ml.load_state_dict(uri)
    except ml.WeightsError:
        sd = None
    record(f"fuzz: mutated {target}", "refused" if sd is None else "correct")
    if target == "index":
        assert sd is not None and {k: raw(v) for k, v in sd.items()} == expect
        return
    if sd is not None:  # accepted: then each tensor is exactly its rows' payload (or its tie's)
        payloads = {m["name"]: p for m, p in (tuple(r) for r in rows) if m["alias"] is None}
        for name, t in sd.items():
            meta = next(m for m, _ in rows if m["name"] == name)
            assert raw(t) == payloads[meta["alias"] or name]
            assert t.numel() * t.element_size() == meta["nbytes"]
    report = ml.verify(uri)
    if report.ok:
        assert sd is not None
        ml.load_state_dict(uri, verify=True)


# --------------------------------------------------------------------------- sidecars


def _runs_dataset(tmp_path: Path) -> tuple[str, dict[str, dict]]:
    """A dataset with two runs' versions (commit properties as log_model writes them)."""
    uri = str(tmp_path / "runs.lance")
    sds = {}
    for run, seed in (("run1", 1), ("run2", 2)):
        sds[run] = {"w": torch.full((4,), float(seed))}
        ml.save_state_dict(sds[run], uri, properties={"mlflow.run_id": run, "mlflow.model_id": f"m-{run}"})
    return uri, sds


@pytest.mark.parametrize("garbage", ["nested", "binary", "huge", "fifo", "wrong-types"])
def test_5_a_sidecar_that_does_not_parse_is_ignored(tmp_path, garbage):
    from mlflow_lance import sidecar

    uri, sds = _runs_dataset(tmp_path)
    path = Path(sidecar.sidecar_uri(uri))
    if path.exists():
        path.unlink()
    if garbage == "nested":
        path.write_text("[" * 200_000 + "]" * 200_000)
    elif garbage == "binary":
        path.write_bytes(bytes(range(256)) * 64)
    elif garbage == "huge":  # 100 MB: not parsed at all (8 MiB limit)
        with open(path, "wb") as f:
            f.truncate(100 << 20)
    elif garbage == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(
            yaml.safe_dump(
                {
                    "runs": {"run1": 7},
                    "logged_models": [],
                    "registered_models": {},
                    "pins": {},
                    "lance_latest_version": "x",
                }
            )
        )
    import time

    before = path.read_bytes() if garbage != "fifo" else None
    started = time.monotonic()
    got = ml.load_state_dict(uri, run_id="run2")
    # the bound stands for a hang (a FIFO read blocks for ever), not a pace: a busy machine takes 20 s
    assert torch.equal(got["w"], sds["run2"]["w"]) and time.monotonic() - started < 120
    if garbage != "fifo":
        assert path.read_bytes() == before  # used as rebuilt in memory; a read never writes
        sidecar.refresh(uri)  # a write (sync, gc, log_model) rebuilds it
        assert sidecar.read(uri) is not None
    record("5 sidecar", "correct")


def test_8_a_sidecar_that_maps_a_run_to_another_runs_version_is_not_believed(tmp_path):
    from mlflow_lance import sidecar

    uri, sds = _runs_dataset(tmp_path)
    doc = sidecar.refresh(uri)
    doc["runs"]["run2"] = [dict(doc["runs"]["run1"][0])]  # run2 -> run1's version
    sidecar.write(uri, doc)
    got = ml.load_state_dict(uri, run_id="run2")
    assert torch.equal(got["w"], sds["run2"]["w"])
    record("8 sidecar", "correct")
    doc = sidecar.refresh(uri)
    doc["runs"]["ghost"] = [dict(doc["runs"]["run1"][0])]  # a run that never logged here
    sidecar.write(uri, doc)
    with pytest.raises(ml.VersionNotFoundError, match="ghost"):
        ml.load_state_dict(uri, run_id="ghost")
    record("8 sidecar", "refused")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 2**80, 1.5, "2"])
def test_8_a_sidecar_version_that_is_not_a_version_is_rebuilt(tmp_path, value):
    """A run's lance_version in the sidecar that is .inf, .nan, a huge or fractional number or
    a string: not believed, the mapping rebuilt, and the run's own version loads."""
    from mlflow_lance import sidecar

    uri, sds = _runs_dataset(tmp_path)
    doc = sidecar.refresh(uri)
    doc["runs"]["run2"][0]["lance_version"] = value
    sidecar.write(uri, doc)
    written = yaml.safe_load(Path(sidecar.sidecar_uri(uri)).read_text())["runs"]["run2"][0]["lance_version"]
    assert written == value or written != written  # as crafted (NaN equals nothing)
    got = ml.load_state_dict(uri, run_id="run2")
    assert torch.equal(got["w"], sds["run2"]["w"])
    record("8 sidecar", "correct")
