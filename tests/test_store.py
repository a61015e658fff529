"""The Lance weight store against real Lance datasets on disk."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

import lance
import pyarrow as pa
import pytest
import torch

import mlflow_lance as ml
from conftest import raw as bits
from mlflow_lance import format, plan, store, tensors
from mlflow_lance.tensors import DTYPES


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert bits(a) == bits(b)


def random_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Random bit patterns of any dtype (floats include NaNs and infinities)."""
    g = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@pytest.fixture
def uri(tmp_path: Path) -> Path:
    return tmp_path / "weights.lance"


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exactly(uri, name):
    dtype = DTYPES[name]
    sd = {
        "matrix": random_tensor(dtype, (7, 5), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": random_tensor(dtype, (0, 3), seed=3),
    }
    ml.save_state_dict(sd, uri)
    out = ml.load_state_dict(uri)
    for k in sd:
        assert_same(out[k], sd[k])
    model_like = {k: torch.empty_like(v) for k, v in sd.items()}
    module = torch.nn.Module()
    for k, v in model_like.items():
        module.register_buffer(k, v)
    ml.load_into(module, uri)
    for k in sd:
        assert_same(getattr(module, k), sd[k])


def test_views_keep_their_values_and_key_order(uri):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = OrderedDict(
        [
            ("z.transposed", base.t()),
            ("a.strided", base[::2, 1::3]),
            ("m.expanded", torch.tensor([1.0, 2.0]).expand(3, 2)),
            ("b.slice_of_storage", base[2]),
        ]
    )
    ml.save_state_dict(sd, uri)
    out = ml.load_state_dict(uri)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert torch.equal(out[k], v) and out[k].is_contiguous()


def test_tensors_larger_than_a_chunk_are_split_and_reassembled(uri):
    big = random_tensor(torch.float32, (1000, 33), seed=5)  # 132,000 bytes
    sd = {"big": big, "small": torch.ones(3)}
    ml.save_state_dict(sd, uri, chunk_bytes=10_000)
    rows = lance.dataset(str(uri)).to_table(columns=["name", "chunk"]).to_pylist()
    assert sum(r["name"] == "big" for r in rows) == 14
    assert_same(ml.load_state_dict(uri)["big"], big)
    module = torch.nn.Module()
    module.register_buffer("big", torch.zeros_like(big))
    module.register_buffer("small", torch.zeros(3))
    ml.load_into(module, uri)
    assert_same(module.big, big)
    assert ml.verify(uri).ok


def test_tied_weights_are_stored_once_and_come_back_tied(uri):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(500, 64)
            self.head = torch.nn.Linear(64, 500, bias=False)
            self.head.weight = self.emb.weight

    torch.manual_seed(0)
    model = Tied()
    info = ml.save_state_dict(model.state_dict(), uri)
    assert info.total_bytes == 500 * 64 * 4  # the shared matrix counted once
    assert du(uri / "data") < 2 * 500 * 64 * 4
    out = ml.load_state_dict(uri)
    assert out["emb.weight"] is out["head.weight"]
    fresh = Tied()
    assert ml.load_into(fresh, uri) == ml.LoadResult([], [])
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight)
    # a module without the tie gets the same values in both places
    untied = Tied()
    untied.head.weight = torch.nn.Parameter(torch.zeros(500, 64))
    ml.load_into(untied, uri)
    assert torch.equal(untied.head.weight, model.emb.weight)


def test_file_uri_and_map_location(uri):
    sd = {"w": torch.randn(4, 4)}
    ml.save_state_dict(sd, f"file://{uri}")
    out = ml.load_state_dict(f"file://{uri}", map_location="cpu")
    assert torch.equal(out["w"], sd["w"]) and out["w"].device.type == "cpu"
    meta = ml.load_state_dict(uri, map_location=torch.device("meta"))
    assert meta["w"].device.type == "meta" and meta["w"].shape == (4, 4)


def test_loaded_tensors_are_writable_without_touching_the_dataset(uri):
    sd = {"w": torch.ones(1000)}
    ml.save_state_dict(sd, uri)
    out = ml.load_state_dict(uri)
    out["w"].mul_(3)  # copy-on-write: the file keeps its bytes
    assert torch.equal(ml.load_state_dict(uri)["w"], torch.ones(1000))
    assert ml.verify(uri).ok


def test_compressed_dataset_round_trips(uri):
    sd = {"zeros": torch.zeros(250_000), "r": torch.randn(100)}
    ml.save_state_dict(sd, uri, compression="zstd")
    assert du(uri / "data") < 100_000  # 1 MB of zeros compresses (to 1/1024: max_zstd_ratio)
    out = ml.load_state_dict(uri)
    for k in sd:
        assert_same(out[k], sd[k])
    sd["r"] = sd["r"] + 1
    info = ml.save_state_dict(sd, uri)  # compression stays what the dataset was created with
    assert info.changed == ("r",)
    with pytest.raises(ValueError, match="compression"):
        ml.save_state_dict(sd, uri, compression="lz4")
    assert ml.verify(uri).ok


# --------------------------------------------------------------------------- partial loads


def test_partial_loads_by_list_prefix_and_glob(uri):
    sd = {f"h.{i}.{p}": torch.full((2,), float(i)) for i in range(3) for p in ("w", "b")}
    ml.save_state_dict(sd, uri)
    assert list(ml.load_state_dict(uri, names=["h.2.b", "h.0.w"])) == ["h.2.b", "h.0.w"]
    assert list(ml.load_state_dict(uri, names="h.1.")) == ["h.1.w", "h.1.b"]
    assert list(ml.load_state_dict(uri, names="h.*.b")) == ["h.0.b", "h.1.b", "h.2.b"]
    assert list(ml.load_state_dict(uri, names="nothing*")) == []
    with pytest.raises(ml.VersionNotFoundError, match="h.9.w"):
        ml.load_state_dict(uri, names=["h.9.w"])


# --------------------------------------------------------------------------- versions and dedup


def test_identical_save_writes_no_tensor_bytes_and_one_change_writes_one_tensor(uri):
    sd = OrderedDict((f"layer{i}", torch.randn(256, 256)) for i in range(6))
    first = ml.save_state_dict(sd, uri, message="init", properties={"step": "0"})
    assert first.version == 1 and first.parent is None and len(first.changed) == 6
    before = du(uri)
    same = ml.save_state_dict(sd, uri)
    assert same.changed == () and same.bytes_written == 0 and same.parent == 1
    assert du(uri) - before < 64 * 1024  # a manifest and a transaction file, no data
    original = sd["layer3"]
    sd["layer3"] = sd["layer3"] + 1
    before = du(uri)
    one = ml.save_state_dict(sd, uri, message="step 1")
    grew = du(uri) - before
    nbytes = 256 * 256 * 4
    assert one.changed == ("layer3",)
    assert nbytes <= one.bytes_written < nbytes + 16 * 1024
    assert nbytes <= grew < nbytes + 1024 * 1024
    assert list(ml.load_state_dict(uri)) == list(sd)  # order kept across reused fragments
    for v, expected in ((1, original), (3, sd["layer3"])):
        assert torch.equal(ml.load_state_dict(uri, v)["layer3"], expected)


def test_added_removed_and_reordered_tensors(uri):
    ml.save_state_dict(OrderedDict(a=torch.ones(2), b=torch.zeros(2), c=torch.ones(3)), uri)
    info = ml.save_state_dict(OrderedDict(c=torch.ones(3), d=torch.ones(1), a=torch.ones(2)), uri)
    assert info.changed == ("d",) and info.removed == ("b",)
    assert list(ml.load_state_dict(uri)) == ["c", "d", "a"]
    d = ml.diff(uri, 1, 2)
    assert (d.added, d.removed, d.changed, sorted(d.unchanged)) == (["d"], ["b"], [], ["a", "c"])
    assert list(ml.load_state_dict(uri, 1)) == ["a", "b", "c"]


def test_dtype_or_shape_change_with_equal_bytes_is_a_change(uri):
    ml.save_state_dict({"w": torch.zeros(4, dtype=torch.int32)}, uri)
    assert ml.save_state_dict({"w": torch.zeros(4, dtype=torch.float32)}, uri).changed == ("w",)
    assert ml.save_state_dict({"w": torch.zeros(2, 2)}, uri).changed == ("w",)
    assert ml.load_state_dict(uri)["w"].shape == (2, 2)


def test_versions_report_what_each_version_wrote(uri):
    n = plan.PACK_TENSOR_BYTES // 4  # unpacked tensors: a version rewrites b alone
    sd = {"a": torch.ones(n), "b": torch.zeros(n)}
    ml.save_state_dict(sd, uri, message="first", properties={"run": "r1"})
    sd["b"] = sd["b"] + 1
    ml.save_state_dict(sd, uri, message="second")
    ml.tag(uri, "best", 1)
    vs = ml.versions(uri)
    assert [v.version for v in vs] == [1, 2]
    assert vs[0].message == "first" and vs[0].properties == {"run": "r1"} and vs[0].tags == ("best",)
    assert vs[0].num_tensors == 2 and vs[0].total_bytes == 8 * n and vs[0].changed == ("a", "b")
    assert vs[1].changed == ("b",) and vs[1].parent == 1 and 4 * n <= vs[1].bytes_written < vs[0].bytes_written
    assert vs[1].timestamp >= vs[0].timestamp and vs[1].timestamp.tzinfo is not None


def test_tags_load_move_and_remove(uri):
    ml.save_state_dict({"w": torch.zeros(3)}, uri)
    ml.save_state_dict({"w": torch.ones(3)}, uri)
    ml.tag(uri, "prod", 1)
    assert torch.equal(ml.load_state_dict(uri, "prod")["w"], torch.zeros(3))
    ml.tag(uri, "prod", 2)  # moving a tag
    assert ml.tags(uri) == {"prod": 2}
    ml.untag(uri, "prod")
    assert ml.tags(uri) == {}
    with pytest.raises(ml.VersionNotFoundError, match="tag 'prod' does not exist"):
        ml.untag(uri, "prod")
    with pytest.raises(ml.VersionNotFoundError, match=r"version 7 does not exist.*versions: 1, 2"):
        ml.tag(uri, "x", 7)
    for bad in ("12", "../../../evil", "a/b", "", ".hidden", "x" * 201, "esc\x1b[2J", 3):
        with pytest.raises(ValueError, match="is not allowed: use letters, digits"):
            ml.tag(uri, bad, 1)
    assert ml.tags(uri) == {} and not (uri.parent / "evil.json").exists()


def test_missing_version_or_tag_lists_what_exists(uri):
    ml.save_state_dict({"w": torch.zeros(3)}, uri)
    ml.tag(uri, "good", 1)
    with pytest.raises(ml.VersionNotFoundError, match=r"version 5 does not exist.*versions: 1; tags: good"):
        ml.load_state_dict(uri, 5)
    with pytest.raises(ml.VersionNotFoundError, match=r"tag 'nope' does not exist.*tags: good"):
        ml.load_state_dict(uri, "nope")


def test_gc_keeps_tagged_latest_and_recent_versions(uri):
    for i in range(5):
        ml.save_state_dict({"w": torch.full((1000,), float(i)), "same": torch.ones(10)}, uri)
    ml.tag(uri, "keep", 2)
    with pytest.raises(ValueError, match="keep_last"):
        store.prune(uri)
    assert store.prune(uri, older_than=timedelta(hours=1), grace=timedelta(0)).removed_versions == []
    assert store.prune(uri, keep_last=2).removed_versions == []  # all superseded within the grace period
    report = store.prune(uri, keep_last=2, grace=timedelta(0))
    assert report.removed_versions == [1, 3] and report.kept_tagged == [2] and report.bytes_removed > 0
    assert report.kept == {2: ["tag:keep"], 4: ["keep_last"], 5: ["latest"]}
    ml.save_state_dict({"w": torch.zeros(3)}, uri)
    why = store.prune(uri, keep_last=1, older_than=timedelta(hours=1), candidates=[2, 5], dry_run=True).kept
    assert why == {  # every reason that holds, each version
        2: ["tag:keep", "older_than", "grace"],  # superseded by 4 (3 is gone) a moment ago
        4: ["not_a_candidate", "older_than", "grace"],
        5: ["older_than", "grace"],
        6: ["latest", "not_a_candidate", "older_than"],
    }
    assert [v.version for v in ml.versions(uri)] == [2, 4, 5, 6]
    for v, value in ((2, 1.0), (4, 3.0), (5, 4.0)):
        out = ml.load_state_dict(uri, v)
        assert torch.equal(out["w"], torch.full((1000,), value)) and torch.equal(out["same"], torch.ones(10))
    assert ml.verify(uri, 2).ok and ml.verify(uri).ok


# --------------------------------------------------------------------------- integrity


def test_verify_and_verified_loads_name_the_corrupt_tensor(uri):
    sd = {"a": torch.randn(1000), "b": torch.randn(1000)}
    ml.save_state_dict(sd, uri)
    assert ml.verify(uri).ok
    ds = lance.dataset(str(uri))
    rows = ds.scanner(columns=["name", "data"], with_row_address=True).to_table().to_pylist()
    b = next(r for r in rows if r["name"] == "b")
    b_file = next(f for f in ds.get_fragments() if f.fragment_id == b["_rowaddr"] >> 32).metadata.files[0].path
    path = uri / "data" / b_file
    raw = bytearray(path.read_bytes())
    raw[b["data"]["position"] + 100] ^= 0xFF  # inside b's payload (a shares the file: packed)
    path.write_bytes(bytes(raw))
    report = ml.verify(uri)
    assert not report.ok and [p.name for p in report.problems] == ["b"]
    assert b_file in report.problems[0].file
    with pytest.raises(ml.CorruptionError, match=r"tensor 'b'.*version 1.*" + b_file[:10]):
        ml.load_state_dict(uri, verify=True)
    module = torch.nn.Module()
    module.register_buffer("a", torch.zeros(1000))
    module.register_buffer("b", torch.zeros(1000))
    with pytest.raises(ml.CorruptionError, match="tensor 'b'"):
        ml.load_into(module, uri, verify=True)


def test_a_missing_or_stale_version_index_is_not_used_and_a_load_never_writes_one(uri):
    sd = {"a": torch.randn(10), "b": torch.randn(20)}
    ml.save_state_dict(sd, uri)
    index = uri / "_mlflow_lance" / "index" / "1.json"
    assert json.loads(index.read_text())["rows"][0][0] == "a"
    index.unlink()
    assert torch.equal(ml.load_state_dict(uri)["b"], sd["b"])  # the rows decoded from the data files
    assert not index.exists()  # reads never write
    ml.save_state_dict(sd, uri)  # a save writes its own version's index
    assert (uri / "_mlflow_lance" / "index" / "2.json").exists()
    index = uri / "_mlflow_lance" / "index" / "2.json"
    doc = json.loads(index.read_text())
    doc["fragments"][0][1] = "someone-elses-file.lance"
    doc["rows"][0][0] = "wrong"
    index.write_text(json.dumps(doc))
    assert list(ml.load_state_dict(uri)) == ["a", "b"]  # stale index ignored


def loads_without_lance(code: str) -> object:
    """Run ``code`` (which sets ``out``) in a fresh interpreter; ``out`` and whether Lance was imported."""
    import subprocess
    import sys

    script = f"import json, sys\n{code}\nprint(json.dumps([out, 'lance' in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_local_load_reads_the_version_index_alone_without_importing_lance(uri):
    sd = {"a": torch.randn(10), "b": torch.arange(6, dtype=torch.int16).reshape(2, 3)}
    ml.save_state_dict(sd, uri)
    sd2 = {**sd, "a": sd["a"] + 1}
    ml.save_state_dict(sd2, uri)
    code = f"""import mlflow_lance as ml, torch
latest, first = ml.load_state_dict({str(uri)!r}), ml.load_state_dict({str(uri)!r}, 1)
out = [[k, v.tolist(), str(v.dtype)] for k, v in [*latest.items(), *first.items()]]"""
    out, imported = loads_without_lance(code)
    assert not imported
    assert out == [[k, v.tolist(), str(v.dtype)] for k, v in [*sd2.items(), *sd.items()]]
    module = torch.nn.Module()
    module.register_buffer("a", torch.zeros(10))
    module.register_buffer("b", torch.zeros(2, 3, dtype=torch.int16))
    ml.load_into(module, uri)
    assert torch.equal(module.a, sd2["a"]) and torch.equal(module.b, sd["b"])


def test_lance_is_used_when_the_index_alone_cannot_answer(uri, tmp_path):
    """A tag, verify=True, a version committed without an index (a Lance restore), an index of
    another dataset's same-numbered version: each loads through Lance, correctly."""
    sd = {"w": torch.randn(8)}
    ml.save_state_dict(sd, uri)
    ml.save_state_dict({"w": sd["w"] * 2}, uri)
    ml.tag(uri, "first", 1)
    for call in (
        f"ml.load_state_dict({str(uri)!r}, 'first')",
        f"ml.load_state_dict({str(uri)!r}, verify=True)",
    ):
        out, imported = loads_without_lance(f"import mlflow_lance as ml\nout = {call}['w'].tolist()")
        assert imported and out in (sd["w"].tolist(), (sd["w"] * 2).tolist())
    lance.dataset(str(uri)).checkout_version(1).restore()  # version 3 = version 1, by Lance alone
    assert not (uri / "_mlflow_lance" / "index" / "3.json").exists()
    out, imported = loads_without_lance(
        f"import mlflow_lance as ml\nout = ml.load_state_dict({str(uri)!r})['w'].tolist()"
    )
    assert imported and out == sd["w"].tolist()
    assert not (uri / "_mlflow_lance" / "index" / "3.json").exists()  # no digest in its commit: always scanned
    other = tmp_path / "other.lance"  # same version numbers, other weights and manifests
    for scale in (5, 6, 7):
        ml.save_state_dict({"w": sd["w"] * scale}, other)
    foreign = json.loads((uri / "_mlflow_lance" / "index" / "2.json").read_text())
    (other / "_mlflow_lance" / "index" / "3.json").write_text(json.dumps({**foreign, "version": 3}))
    assert torch.equal(ml.load_state_dict(other)["w"], sd["w"] * 7)


def test_an_index_read_alone_gets_the_same_checks(uri):
    """A self-consistent index (its digest recomputed) that lies about a tensor is not believed:
    its rows have problems, so Lance's rows answer."""
    sd = {"a": torch.randn(16), "b": torch.randn(4)}
    ml.save_state_dict(sd, uri)
    index = uri / "_mlflow_lance" / "index" / "1.json"
    doc = json.loads(index.read_text())
    doc["rows"][0][4] = "int64"  # a's dtype: 64 bytes no longer make [16] of it
    index.write_text(json.dumps(_self_consistent(doc)))
    out = ml.load_state_dict(uri)
    assert out["a"].dtype == torch.float32 and torch.equal(out["a"], sd["a"])


def _self_consistent(doc: dict) -> dict:
    """The index with the digest among its own properties recomputed (what a forger would do)."""
    metas = [dict(zip(tensors.META_COLUMNS, r[: len(tensors.META_COLUMNS)], strict=True)) for r in doc["rows"]]
    doc["properties"]["mlflow_lance.rows"] = format.rows_digest(metas)
    return doc


def _null_position(doc: dict) -> None:
    doc["rows"][0][-2] = None
    doc["rows"][0][3] = doc["rows"][0][5][0] = 1 << 36  # and claim 64 GiB of int8


INDEX_FORGERIES = {
    "no position (would read through Lance after allocating)": _null_position,
    "a dimension past int64": lambda doc: doc["rows"][2].__setitem__(5, [0, 1 << 70]),  # e: no bytes
    "no manifest binding": lambda doc: doc.pop("manifest"),
    "a null manifest binding": lambda doc: doc.__setitem__("manifest", None),
}


@pytest.mark.parametrize("forgery", sorted(INDEX_FORGERIES))
def test_a_forged_index_is_not_read_alone(uri, forgery):
    """Indexes that are consistent with themselves but not something an honest writer makes:
    each sends the load to Lance, whose rows answer (no huge allocation, no overflow)."""
    sd = {"a": torch.arange(64, dtype=torch.int8), "b": torch.randn(4), "e": torch.empty(0, 4)}
    ml.save_state_dict(sd, uri)
    index = uri / "_mlflow_lance" / "index" / "1.json"
    doc = json.loads(index.read_text())
    INDEX_FORGERIES[forgery](doc)
    index.write_text(json.dumps(_self_consistent(doc)))
    out = ml.load_state_dict(uri)
    assert all(torch.equal(out[k], v) for k, v in sd.items())


def test_an_index_folder_that_links_elsewhere_is_not_read(uri, tmp_path):
    sd = {"w": torch.randn(8)}
    ml.save_state_dict(sd, uri)
    folder = uri / "_mlflow_lance" / "index"
    elsewhere = tmp_path / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere)
    doc = json.loads((elsewhere / "1.json").read_text())
    doc["rows"][0][4] = "int32"  # a forged index outside the dataset, consistent with itself
    (elsewhere / "1.json").write_text(json.dumps(_self_consistent(doc)))
    out, imported = loads_without_lance(
        f"import mlflow_lance as ml\nout = str(ml.load_state_dict({str(uri)!r})['w'].dtype)"
    )
    assert out == "torch.float32" and imported


# --------------------------------------------------------------------------- the docs example's datasets


def test_datasets_written_by_the_docs_example_load(uri):
    from docs_example import docs_save_model

    sd = OrderedDict(w=torch.randn(3, 4), b=torch.arange(5, dtype=torch.float32))
    docs_save_model(sd, str(uri))
    docs_save_model(OrderedDict(w=torch.zeros(3, 4), b=torch.ones(5)), str(uri), version=True)
    out = ml.load_state_dict(uri, 1)
    assert list(out) == ["w", "b"] and out["w"].dtype == torch.float64 and out["w"].shape == (3, 4)
    assert torch.equal(out["w"], sd["w"].double()) and torch.equal(out["b"], sd["b"].double())
    assert torch.equal(ml.load_state_dict(uri)["b"], torch.ones(5, dtype=torch.float64))
    model = torch.nn.Module()
    model.register_buffer("w", torch.empty(3, 4))
    model.register_buffer("b", torch.empty(5))
    ml.load_into(model, uri, 1)
    assert torch.equal(model.w, sd["w"]) and model.w.dtype == torch.float32
    assert [v.num_tensors for v in ml.versions(uri)] == [2, 2]
    assert ml.diff(uri, 1, 2).changed == ["w", "b"]
    with pytest.raises(ml.WeightsError, match="docs example"):
        ml.save_state_dict(sd, uri)


def test_the_docs_example_format_is_read_through_the_same_reader_interface(tmp_path):
    """One reader per format, chosen from the schema; callers use the same methods on both."""
    from docs_example import docs_save_model

    from mlflow_lance import readers as rd
    from mlflow_lance.dataset import Dataset

    sd = OrderedDict(w=torch.randn(3, 4, dtype=torch.float64), b=torch.arange(5, dtype=torch.float64))
    docs_save_model(sd, str(tmp_path / "seed.lance"))
    ml.save_state_dict(sd, tmp_path / "ours.lance")
    handles = {name: Dataset(tmp_path / name) for name in ("seed.lance", "ours.lance")}
    readers = {name: rd.describe(h, h.lance) for name, h in handles.items()}
    seed, ours = readers["seed.lance"], readers["ours.lance"]
    assert (seed.writable, ours.writable) == (False, True) and (seed.hashed, ours.hashed) == (False, True)
    for reader in readers.values():
        entries, problems = reader.entries, reader.problems()
        assert problems == [] and list(entries) == list(reader.entries) == ["w", "b"]
        assert [(e.dtype, e.shape) for e in entries.values()] == [("float64", [3, 4]), ("float64", [5])]
        with reader:
            loaded = rd.materialize(reader, list(entries.values()), verify=True)
            row = entries["w"].rows[0]
            chunk = torch.empty(row.size, dtype=torch.uint8)
            reader.read_many([(row, chunk)])
            assert reader.bad_hash(row, chunk) is None
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
        assert "mlflow_lance.tree" not in (reader.properties() or {})
    assert ours.bad_hash(ours.entries["w"].rows[0], torch.zeros(96, dtype=torch.uint8)) is not None
    lance.write_dataset(pa.table({"x": [1]}), str(tmp_path / "other.lance"))
    other = Dataset(tmp_path / "other.lance")
    with pytest.raises(ml.WeightsError, match="not a weights dataset"):
        rd.describe(other, other.lance)


# --------------------------------------------------------------------------- load_into


class Net(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = torch.nn.Linear(4, width)
        self.bn = torch.nn.BatchNorm1d(width)


def test_load_into_checks_keys_and_shapes_before_writing(uri):
    torch.manual_seed(0)
    src = Net()
    ml.save_state_dict(src.state_dict(), uri)
    dst = Net(width=9)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"size mismatch for fc.weight"):
        ml.load_into(dst, uri)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())

    extra = Net()
    extra.extra = torch.nn.Linear(1, 1)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*extra.weight"):
        ml.load_into(extra, uri)
    result = ml.load_into(extra, uri, strict=False)
    assert result.missing_keys == ["extra.weight", "extra.bias"] and result.unexpected_keys == []
    assert torch.equal(extra.fc.weight, src.fc.weight)
    assert torch.equal(extra.bn.num_batches_tracked, src.bn.num_batches_tracked)


def test_load_into_casts_to_the_modules_dtype(uri):
    torch.manual_seed(0)
    src = Net()
    ml.save_state_dict(src.state_dict(), uri)
    dst = Net().double()
    ml.load_into(dst, uri)
    assert dst.fc.weight.dtype == torch.float64
    assert torch.equal(dst.fc.weight, src.fc.weight.double())


# --------------------------------------------------------------------------- bad input, nothing written


def _bad_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant4 = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint4x2)
    return [
        ({"w": torch.ones(1), "opt": object()}, TypeError, r"\['opt'\] is a builtins.object.*never pickles"),
        ({"w": torch.ones(2, 2).to_mkldnn()}, TypeError, r"\['w'\] has layout torch._mkldnn.*to_dense"),
        ({"w": quant4}, TypeError, r"\['w'\] is quantized as torch.quint4x2.*dequantize"),
        ({"w": torch.empty(3, device="meta")}, ValueError, "'w' is on the meta device"),
        ({"": torch.ones(1)}, ValueError, "empty"),
        ({" w": torch.ones(1)}, ValueError, "whitespace"),
        ({"a\nb": torch.ones(1)}, ValueError, "control characters"),
        ({"x" * 2000: torch.ones(1)}, ValueError, "longer than 1024"),
        ({}, ValueError, "holds no tensor"),
        ([torch.ones(1)], TypeError, "Invalid object type for `state_dict`"),
    ]


@pytest.mark.parametrize("bad", [{"w": [1.0, 2.0]}, {"w": 3}, {}])
def test_a_checkpoint_dict_without_a_tensor_is_refused(uri, bad):
    with pytest.raises(ValueError, match="holds no tensor"):
        ml.save_state_dict(bad, uri)
    assert not uri.exists()


@pytest.mark.parametrize("bad, exc, message", _bad_inputs())
def test_bad_state_dicts_are_refused_before_anything_is_written(uri, bad, exc, message):
    with pytest.raises(exc, match=message):
        ml.save_state_dict(bad, uri)
    assert not uri.exists()
    if not (isinstance(bad, dict) and bad):
        return
    # the same entry next to good ones, into an existing dataset: still nothing written
    ml.save_state_dict({"ok": torch.ones(2)}, uri)
    files = sorted(p.name for p in uri.rglob("*"))
    with pytest.raises(exc, match=message):
        ml.save_state_dict({"ok": torch.zeros(2), **bad}, uri)
    assert sorted(p.name for p in uri.rglob("*")) == files
    assert [v.version for v in ml.versions(uri)] == [1]


def test_bad_properties_and_options_are_refused(uri):
    with pytest.raises(TypeError, match="properties must map str to str"):
        ml.save_state_dict({"w": torch.ones(1)}, uri, properties={"step": 3})
    with pytest.raises(ValueError, match="compression"):
        ml.save_state_dict({"w": torch.ones(1)}, uri, compression="gzip9")
    with pytest.raises(ValueError, match="chunk_bytes"):
        ml.save_state_dict({"w": torch.ones(1)}, uri, chunk_bytes=0)
    assert not uri.exists()
    ml.save_state_dict({"w": torch.ones(1)}, uri)
    with pytest.raises(TypeError, match="map_location"):
        ml.load_state_dict(uri, map_location={"cuda:0": "cpu"})
    with pytest.raises(TypeError, match="version must be"):
        ml.load_state_dict(uri, 1.5)


def test_uris_that_are_not_weights_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights dataset at"):
        ml.load_state_dict(tmp_path / "missing.lance")
    plain = tmp_path / "plain.lance"
    lance.write_dataset(pa.table({"id": [1, 2], "text": ["a", "b"]}), str(plain))
    with pytest.raises(ml.WeightsError, match=r"not a weights dataset \(columns: id, text\)"):
        ml.load_state_dict(plain)
    with pytest.raises(ml.WeightsError, match="not a weights dataset"):
        ml.save_state_dict({"w": torch.ones(1)}, plain)
    assert [v["version"] for v in lance.dataset(str(plain)).versions()] == [1]


def test_a_newer_format_is_refused_with_upgrade_advice(uri):
    ml.save_state_dict({"w": torch.ones(1)}, uri)
    ds = lance.dataset(str(uri))
    ds.update_schema_metadata({"mlflow_lance.format": "99", "mlflow_lance.compression": "none"}, replace=True)
    with pytest.raises(ml.WeightsError, match="format 99, newer than this mlflow-lance reads.*upgrade"):
        ml.load_state_dict(uri)
