"""Packing: runs of small tensors share one fragment (one data file) and are reused whole."""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from pathlib import Path

import lance
import pytest
import torch

import mlflow_lance as ml
from conftest import raw as bits
from mlflow_lance import format, plan, store, writer
from mlflow_lance.tensors import to_rows

SMALL = plan.PACK_RUN_BYTES // 8  # bytes of one packed tensor: 8 fill a run
assert SMALL < plan.PACK_TENSOR_BYTES


def small(seed: int, dtype: torch.dtype = torch.float32, nbytes: int = SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype) if dtype != torch.bool else (raw % 2).view(torch.bool)


def two_runs() -> OrderedDict[str, torch.Tensor]:
    """Four small tensors, a large one, four small ones: two runs and one single file."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict((f"a{i}", small(i)) for i in range(4))
    sd["big"] = small(9, nbytes=plan.PACK_TENSOR_BYTES)
    sd.update((f"b{i}", small(10 + i)) for i in range(4))
    return sd


def files_of(uri: Path, version: int | None = None) -> dict[str, str]:
    """Tensor name -> the data file holding its (first) row."""
    ds = lance.dataset(str(uri), version=version)
    paths = {f.fragment_id: f.metadata.files[0].path for f in ds.get_fragments()}
    rows = ds.to_table(columns=["name"], with_row_address=True).to_pylist()
    return {r["name"]: paths[r["_rowaddr"] >> 32] for r in rows}


def assert_loads(uri: Path, sd: dict[str, torch.Tensor], version: int | None = None) -> None:
    """Every way of loading returns exactly ``sd``: maps, preadv reads, verified, into a module."""
    for env in ("1", "0"):
        os.environ["MLFLOW_LANCE_MMAP"] = env
        try:
            for verify in (False, True):
                got = ml.load_state_dict(uri, version, verify=verify)
                assert list(got) == list(sd)
                for k, v in sd.items():
                    assert got[k].dtype == v.dtype and got[k].shape == v.shape and bits(got[k]) == bits(v), k
        finally:
            del os.environ["MLFLOW_LANCE_MMAP"]
    holder = torch.nn.Module()
    for k, v in sd.items():
        holder.register_buffer(k, torch.zeros_like(v))
    ml.load_into(holder, uri, version)
    assert all(bits(holder.get_buffer(k)) == bits(v) for k, v in sd.items())


def test_small_tensors_share_data_files_and_large_ones_do_not(tmp_path: Path):
    uri = tmp_path / "w.lance"
    ml.save_state_dict(two_runs(), uri)
    files = files_of(uri)
    assert len({files[f"a{i}"] for i in range(4)}) == 1
    assert len({files[f"b{i}"] for i in range(4)}) == 1
    assert len(set(files.values())) == 3
    assert len(os.listdir(uri / "data")) == 3


def test_runs_hold_at_most_the_run_limit(tmp_path: Path):
    uri = tmp_path / "w.lance"
    sd = OrderedDict((f"t{i}", small(i)) for i in range(20))  # 2.5 runs' worth
    ml.save_state_dict(sd, uri)
    ds = lance.dataset(str(uri))
    assert [f.metadata.physical_rows for f in ds.get_fragments()] == [8, 8, 4]
    assert all(f.metadata.files[0].file_size_bytes < plan.PACK_RUN_BYTES + 64 * 1024 for f in ds.get_fragments())


def test_changing_one_packed_tensor_rewrites_only_its_run(tmp_path: Path):
    uri = tmp_path / "w.lance"
    sd = two_runs()
    ml.save_state_dict(sd, uri)
    before = files_of(uri)
    sd["b2"] = sd["b2"] + 1
    info = ml.save_state_dict(sd, uri)
    after = files_of(uri)
    assert info.changed == ("b2",)
    run = 4 * SMALL
    assert run <= info.bytes_written < run + 16 * 1024  # the run, not the model
    assert all(after[k] == before[k] for k in ("a0", "a1", "a2", "a3", "big"))
    # the rewritten run is split: the changed tensor apart from its unchanged neighbours
    assert after["b0"] == after["b1"] != after["b2"] != after["b3"] and after["b0"] != before["b0"]
    assert_loads(uri, sd)
    assert ml.verify(uri).ok and ml.verify(uri, 1).ok
    sd["b2"] = sd["b2"] + 1  # from then on, the tensor that keeps changing costs its own bytes only
    info = ml.save_state_dict(sd, uri)
    assert info.changed == ("b2",) and SMALL <= info.bytes_written < SMALL + 16 * 1024
    assert all(files_of(uri)[k] == after[k] for k in ("a0", "b0", "b1", "b3", "big"))
    assert_loads(uri, sd)


def test_a_removed_or_moved_packed_tensor_rewrites_its_run_and_loads(tmp_path: Path):
    uri = tmp_path / "w.lance"
    sd = two_runs()
    ml.save_state_dict(sd, uri)
    del sd["a1"]
    info = ml.save_state_dict(sd, uri)
    assert info.removed == ("a1",) and info.changed == ()
    assert 3 * SMALL <= info.bytes_written < 4 * SMALL
    sd.move_to_end("a0")  # a0 now after b3: its run is rewritten, the b run kept
    assert ml.save_state_dict(sd, uri).changed == ()
    assert_loads(uri, sd)


def test_partial_load_of_a_packed_tensor_reads_only_its_bytes(tmp_path: Path, monkeypatch):
    uri = tmp_path / "w.lance"
    sd = two_runs()
    ml.save_state_dict(sd, uri)
    ml.load_state_dict(uri, names=["a0"])  # the version index now exists
    monkeypatch.setenv("MLFLOW_LANCE_MMAP", "0")

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])

    before = rchar()
    got = ml.load_state_dict(uri, names=["a2"])
    read = rchar() - before
    assert bits(got["a2"]) == bits(sd["a2"])
    assert SMALL <= read < SMALL + 64 * 1024, read  # not the run's 4 x SMALL


def test_packed_rows_of_every_dtype_are_contiguous_aligned_and_load_every_way(tmp_path: Path):
    uri = tmp_path / "w.lance"
    dtypes = [torch.float64, torch.bfloat16, torch.int8, torch.bool, torch.float16, torch.int64, torch.uint8]
    sd = OrderedDict((f"t{i}_{str(d)[6:]}_{n}", small(i, d, n)) for i, d in enumerate(dtypes) for n in (8, 24, 1000))
    sd["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    sd["empty"] = torch.empty(0, 3)
    sd["odd"] = torch.arange(3, dtype=torch.uint8)  # 3 bytes: the next payload must stay aligned
    sd["tied"] = sd["t0_float64_8"]  # a tie inside a run
    ml.save_state_dict(sd, uri)
    ds = lance.dataset(str(uri))
    assert len(ds.get_fragments()) == 1
    rows = ds.scanner(columns=["name", "dtype", "data"], with_row_address=True).to_table().to_pylist()
    spans = sorted((r["data"]["position"], r["data"]["size"]) for r in rows if r["data"]["size"])
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))  # no overlap
    assert all(pos % 8 == 0 for pos, _ in spans)  # maps of any dtype need aligned payloads
    data = (uri / "data" / ds.get_fragments()[0].metadata.files[0].path).read_bytes()
    for r in rows:
        pos, n = r["data"]["position"], r["data"]["size"]
        if r["name"] != "tied":
            assert data[pos : pos + n] == bits(sd[r["name"]]), r["name"]
    loaded = ml.load_state_dict(uri)
    assert loaded["tied"].data_ptr() == loaded["t0_float64_8"].data_ptr()
    assert_loads(uri, sd)


def test_compressed_datasets_pack_too(tmp_path: Path):
    uri = tmp_path / "w.lance"
    sd = two_runs()
    sd["zeros"] = torch.zeros(1000)
    ml.save_state_dict(sd, uri, compression="zstd")
    assert len(os.listdir(uri / "data")) == 3
    sd["a3"] = sd["a3"] * 2
    assert ml.save_state_dict(sd, uri).changed == ("a3",)
    assert_loads(uri, sd)
    assert ml.verify(uri).ok


def test_old_one_row_per_fragment_datasets_load_and_take_packed_versions(tmp_path: Path, monkeypatch):
    uri = tmp_path / "w.lance"
    sd = two_runs()
    monkeypatch.setattr(plan, "PACK_TENSOR_BYTES", 0)  # how versions were written before packing
    ml.save_state_dict(sd, uri)
    monkeypatch.undo()
    old = files_of(uri)
    assert len(set(old.values())) == len(sd)
    assert_loads(uri, sd)
    sd["a1"] = sd["a1"] - 1
    sd["new0"], sd["new1"] = small(50), small(51)
    info = ml.save_state_dict(sd, uri)
    assert set(info.changed) == {"a1", "new0", "new1"}
    new = files_of(uri)
    assert all(new[k] == old[k] for k in old if k != "a1")  # one-row fragments are reused whole
    assert new["new0"] == new["new1"] != new["a1"]  # new small tensors next to each other pack
    assert_loads(uri, sd)
    assert_loads(uri, two_runs(), version=1)
    assert ml.verify(uri).ok


def test_a_failed_commit_leaves_the_previous_version_whole(tmp_path: Path, monkeypatch):
    uri = tmp_path / "w.lance"
    sd = two_runs()
    ml.save_state_dict(sd, uri)
    changed = OrderedDict((k, v + 1 if k.startswith("a") else v) for k, v in sd.items())

    def fail(*args, **kwargs):
        raise OSError("injected: the process died before its commit")

    monkeypatch.setattr(writer, "_commit", fail)
    with pytest.raises(OSError, match="injected"):
        ml.save_state_dict(changed, uri)
    monkeypatch.undo()
    assert store.latest_version(uri) == 1
    assert_loads(uri, sd)
    assert ml.verify(uri).ok
    assert ml.save_state_dict(changed, uri).changed == ("a0", "a1", "a2", "a3")
    assert_loads(uri, changed)


# --------------------------------------------------------------------------- the plan, without Lance


def entry(t, fragment: int, row: int) -> format.Entry:
    """A stored single-row tensor at row ``row`` of fragment ``fragment``."""
    meta = t.meta[0]
    return format.Entry(
        t.name,
        meta["dtype"],
        meta["shape"],
        meta["nbytes"],
        None,
        t.meta,
        [format.Row(0, 0, t.nbytes, meta["hash"], fragment << 32 | row, 0, 0, "f", t.nbytes)],
    )


def test_plan_reuses_whole_fragments_only():
    ts = [to_rows(f"t{i}", small(i)) for i in range(4)]
    previous = {t.name: entry(t, 7, i) for i, t in enumerate(ts[:3])}  # t0..t2 in fragment 7
    units, changed = plan.plan_version(ts, previous, {7: 3})
    assert [u.reused for u in units] == [7, None] and changed == ["t3"]
    assert [m["name"] for m, _ in units[0].rows] == ["t0", "t1", "t2"]

    ts[1] = to_rows("t1", small(99))  # one tensor of the fragment changed: the run is rewritten,
    units, changed = plan.plan_version(ts, previous, {7: 3})  # changed apart from unchanged
    assert [u.reused for u in units] == [None] * 4 and changed == ["t1", "t3"]
    assert [[m["name"] for m, _ in u.rows] for u in units] == [["t0"], ["t1"], ["t2"], ["t3"]]

    units, _ = plan.plan_version(ts[:1], previous, {7: 3})  # a fragment partly in the new version
    assert units[0].reused is None


def test_plan_packs_small_tensors_between_large_ones_and_keeps_chunks_apart():
    big = torch.zeros(plan.PACK_TENSOR_BYTES // 4)
    ts = [
        to_rows("s0", small(0)),
        to_rows("big", big),
        to_rows("s1", small(1)),
        to_rows("s2", small(2)),
        to_rows("chunked", small(3), chunk_bytes=SMALL // 2),
    ]
    units, changed = plan.plan_version(ts, {}, {})
    assert [[m["name"] for m, _ in u.rows] for u in units] == [
        ["s0"],
        ["big"],
        ["s1", "s2"],
        ["chunked"],
        ["chunked"],
    ]
    assert changed == [t.name for t in ts]


def test_a_large_compressed_save_writes_in_parallel_threads(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(writer, "_PARALLEL_WRITE_BYTES", 1)  # every save takes the threaded path
    uri = tmp_path / "w.lance"
    sd = two_runs()
    sd.update((f"c{i}", small(20 + i)) for i in range(3))  # runs of 4, 4 and 3 rows: several calls
    for step in range(3):
        sd = OrderedDict((k, v + step if v.is_floating_point() else v) for k, v in sd.items())
        ml.save_state_dict(sd, uri, compression="zstd")
    assert_loads(uri, sd)
    assert ml.verify(uri, 1).ok
