"""Sharded saves and loads under real torch.distributed (gloo on CPU, spawned ranks): FSDP2
saved at 2 and 4 ranks, loaded at 4, 2 and 1 bit-exactly, training resumed bit-identically;
DDP written once; tensor parallel; a rank killed mid-save. The plan itself is tested pure."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import dist_workers as W
import pytest
import torch

from conftest import raw
from mlflow_lance import distributed, store
from mlflow_lance.distributed import plan_chunks


def _read(tmp, name: str) -> dict:
    with open(os.path.join(tmp, name)) as f:
        return json.load(f)


# --------------------------------------------------------------------------- the plan, pure


def test_plan_shards_in_order_and_replicated_once_balanced():
    # two ranks: "w" sharded in two halves; "b" and "c" replicated (DDP-style), 8 bytes each
    layouts = [
        [("w", "float32", (4, 2), 0, 16), ("b", "float32", (2,), 0, 8), ("c", "float32", (2,), 0, 8)],
        [("w", "float32", (4, 2), 16, 16), ("b", "float32", (2,), 0, 8), ("c", "float32", (2,), 0, 8)],
    ]
    chunks = plan_chunks(layouts, {})
    assert [(c.name, c.index, c.start, c.size, c.owner) for c in chunks] == [
        ("w", 0, 0, 16, 0),
        ("w", 1, 16, 16, 1),
        ("b", 0, 0, 8, 1),  # the writer before it holds it, within its even share (24 bytes)
        ("c", 0, 0, 8, 0),  # rank 1 would go past its share: the rank with fewer bytes
    ]


def test_plan_cuts_chunks_and_keeps_ties_and_empty_tensors():
    layouts = [
        [("w", "uint8", (10,), 0, 6), ("t", "uint8", (10,), 0, 6), ("e", "float32", (0,), 0, 0)],
        [("w", "uint8", (10,), 6, 4), ("t", "uint8", (10,), 6, 4), ("e", "float32", (0,), 0, 0)],
    ]
    chunks = plan_chunks(layouts, {"t": "w"}, chunk_bytes=4)
    assert [(c.name, c.index, c.start, c.size, c.owner, c.tie) for c in chunks] == [
        ("w", 0, 0, 4, 0, None),
        ("w", 1, 4, 2, 0, None),
        ("w", 2, 6, 4, 1, None),
        ("t", 0, 0, 0, 0, "w"),
        ("e", 0, 0, 0, 1, None),  # the rank with fewer bytes planned
    ]


@pytest.mark.parametrize(
    ("other", "error"),
    [
        ([("w", "float16", (4,), 8, 8)], "float32 \\[4\\] on one rank and float16"),
        ([("w", "float32", (4,), 4, 12)], "overlap at byte 4"),
        ([("w", "float32", (4,), 12, 4)], "leave a gap at byte 8"),
        ([("w", "float32", (4,), 8, 4)], "cover 12 of its 16 bytes"),
        ([("v", "float32", (4,), 8, 8)], "other tensors than rank 0"),
    ],
)
def test_plan_refuses_shards_that_disagree(other, error):
    with pytest.raises(ValueError, match=error):
        plan_chunks([[("w", "float32", (4,), 0, 8)], other], {})


# --------------------------------------------------------------------------- FSDP2


def test_fsdp_saved_at_2_and_4_loads_at_4_2_and_1_and_resumes_bit_identically(tmp_path):
    """2 ranks train and save; 4 ranks load it (2 -> 4), save again and reload (4 -> 4); 2 ranks
    load that (4 -> 2) and train on: bit-identical to the run that never stopped; one process
    with no process group loads it whole."""
    uri = str(tmp_path / "ckpt.lance")
    tmp = str(tmp_path)
    W.run(W.fsdp_first, 2, tmp, uri)
    first = _read(tmp, "first.json")
    W.run(W.fsdp_reshard, 4, tmp, uri, first["version"], True)
    at4 = _read(tmp, "reshard4.json")
    assert at4["step"] == W.STEPS_BEFORE
    assert at4["loaded"] == [] and at4["reloaded"] == []  # bit-exact: nothing differs
    assert at4["unchanged_bytes_written"] == 0  # a save of unchanged shards writes nothing
    W.run(W.fsdp_reshard, 2, tmp, uri, at4["resaved"], False)
    at2 = _read(tmp, "reshard2.json")
    assert at2["loaded"] == [] and at2["resumed"] == []

    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    whole = store.read_state_dict(uri, at4["resaved"])  # one process, no process group
    assert whole["step"] == W.STEPS_BEFORE
    assert set(whole["model"]) == set(reference["model"])
    for k, v in reference["model"].items():
        assert raw(whole["model"][k]) == raw(v), k
    for fqn, state in reference["optimizer"]["state"].items():
        for k, v in state.items():
            assert raw(whole["optimizer"]["state"][fqn][k]) == raw(v), (fqn, k)
    plain = W.Tiny()  # the same load API in one process, into plain tensors
    stored = distributed.load({"model": plain.state_dict()}, uri, at4["resaved"], strict=True)
    assert stored["step"] == W.STEPS_BEFORE
    assert all(raw(plain.state_dict()[k]) == raw(v) for k, v in reference["model"].items())
    versions = store.versions(uri)
    assert [v.version for v in versions] == [first["version"], at4["resaved"], at4["resaved"] + 1]


# --------------------------------------------------------------------------- DDP and tensor parallel


def test_ddp_writes_replicated_tensors_once_and_tp_shards_load_back(tmp_path):
    ddp_uri, tp_uri = str(tmp_path / "ddp.lance"), str(tmp_path / "tp.lance")
    W.run(W.ddp_and_tp, 2, str(tmp_path), ddp_uri, tp_uri)
    got = _read(tmp_path, "ddp_tp.json")
    alone = store.save_state_dict(W.Tiny().state_dict(), str(tmp_path / "alone.lance"))
    data = sum(f.stat().st_size for f in (tmp_path / "ddp.lance" / "data").iterdir())
    file_overhead = alone.bytes_written - alone.total_bytes  # what one Lance file adds to its payload
    assert alone.total_bytes > file_overhead  # so that a second copy of the payload would show
    # once, not once per rank: two files (one per rank), the payload once
    assert got["first_written"] <= alone.bytes_written + file_overhead + 1024, (got, alone)
    assert got["second_changed"] == ["head.weight"]
    plain = W.Tiny()  # the same change saved by one process: small tensors share packed runs,
    store.save_state_dict(plain.state_dict(), str(tmp_path / "one.lance"))  # rewritten as a whole
    plain.head.weight.data.add_(1.0)
    single = store.save_state_dict(plain.state_dict(), str(tmp_path / "one.lance"))
    assert got["second_written"] <= single.bytes_written, (got, single)  # no more than one process
    assert data == got["first_written"] + got["second_written"]
    expected = torch.load(tmp_path / "ddp.pt", weights_only=True)
    loaded = store.read_state_dict(ddp_uri)
    assert list(loaded) == list(expected) and all(raw(loaded[k]) == raw(v) for k, v in expected.items())

    assert got["tp_reloaded"] == [] and got["lonely_version"] == 1
    expected_tp = torch.load(tmp_path / "tp.pt", weights_only=True)
    whole = store.read_state_dict(tp_uri, got["tp_version"])  # row- and column-wise shards, whole
    assert all(raw(whole[k]) == raw(v) for k, v in expected_tp.items())


def test_fsdp_over_tensor_parallel_loads_back_in_2d_in_fsdp_alone_and_whole(tmp_path):
    """A 2 x 2 mesh (FSDP2 over TP: strided shards) saved with AdamW state loads bit-exactly
    into a fresh 2-D model, into an FSDP-only model over all 4 ranks, and in one process; a
    read that fails on one rank raises on every rank instead of leaving them in a collective."""
    uri = str(tmp_path / "2d.lance")
    W.run(W.two_d, 4, str(tmp_path), uri)
    got = _read(tmp_path, "two_d.json")
    assert any("_StridedShard" in p for p in got["placements"]), got["placements"]
    assert got["uneven"], got  # the head's 11 rows: 6 and 5 over TP, then 3 / 3 and 3 / 2 over FSDP
    assert got["2d"] == [] and got["fsdp"] == [], got
    assert got["one_failed"].startswith("RuntimeError: loading the sharded state failed on rank 1 (VersionNotFound")
    expected = torch.load(tmp_path / "two_d.pt", weights_only=True)
    whole = W.flat_tensors(store.read_state_dict(uri, got["version"]))
    assert sorted(whole) == sorted(expected) and all(raw(whole[k]) == raw(v) for k, v in expected.items())


# --------------------------------------------------------------------------- a rank killed mid-save

KILLS = [  # (victim, where): before writing, after writing its files, rank 0 before the commit
    (1, "_write_mine"),
    (1, "write_units"),
    (0, "write_units"),
    (0, "commit_version"),
    (1, "plan_chunks"),
]


@pytest.mark.parametrize(("victim", "point"), KILLS, ids=[f"rank{v}-{p}" for v, p in KILLS])
def test_a_rank_killed_mid_save_leaves_no_version_and_gc_reclaims_its_files(tmp_path, victim, point):
    uri = str(tmp_path / "ckpt.lance")
    model = W.Tiny()
    store.save_state_dict(model.state_dict(), uri)  # an earlier version, which must stay loadable
    before = {f.name for f in (tmp_path / "ckpt.lance" / "data").iterdir()}
    codes = W.run(W.killed, 2, str(tmp_path), uri, victim, point, deaths=True, timeout=120)
    assert codes[victim] == -9 and codes[1 - victim] == 0, codes
    survivor = _read(tmp_path, f"killed{1 - victim}.json")["outcome"]
    assert survivor != "committed" and ("RuntimeError" in survivor or "Connection" in survivor), survivor
    assert [v.version for v in store.versions(uri)] == [1]
    loaded = store.read_state_dict(uri)
    assert all(raw(loaded[k]) == raw(v) for k, v in model.state_dict().items())
    orphans = {f.name for f in (tmp_path / "ckpt.lance" / "data").iterdir()} - before
    assert orphans if point == "write_units" else True  # the victim's files are down, no version names them
    report = store.prune(uri, keep_last=1, grace=timedelta(0))
    after = {f.name for f in (tmp_path / "ckpt.lance" / "data").iterdir()}
    assert after == before, (report, sorted(after - before))
    info = store.save_state_dict(W.Tiny().state_dict(), uri)  # the next save works
    assert info.version == 2


# --------------------------------------------------------------------------- through MLflow


def test_fsdp_ranks_log_one_checkpoint_and_one_model_to_one_run_and_resume(tmp_path):
    """log_checkpoint / log_model / load_checkpoint called on every rank of an FSDP2 job: one
    run, one logged model per call, the same result on every rank; the checkpoint loads in one
    process (load_model, load_checkpoint) with no process group and no consolidation step."""
    import mlflow

    import mlflow_lance as ml
    from mlflow_lance import checkpoint

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    W.run(W.mlflow_checkpoints, 2, str(tmp_path), tracking)
    ranks = [_read(tmp_path, f"mlflow{r}.json") for r in range(2)]
    broken = [r.pop("broken") for r in ranks]
    assert broken[0] != "logged" and broken[1] == "RuntimeError: rank 0", broken  # rank 0's error, named on rank 1
    assert ranks[0] == ranks[1]  # every rank got the same checkpoints and model back
    got = ranks[0]
    assert got["loaded"] == [] and got["caught_up"] == [] and got["resumed"] == []  # trained during the write
    assert got["restored_step"] == W.STEPS_BEFORE + 1
    first_id, run_id, first_version = got["first"]
    second_id, second_run, second_version, deleted, second_uri = got["second"]
    assert second_run == run_id and second_version == first_version + 1 and deleted == [first_id]

    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == "dist"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [
        run_id
    ]  # one run, not one per rank
    models = client.search_logged_models([experiment.experiment_id])
    status = {m.name: str(m.status) for m in models}
    assert "FAILED" in status.pop("broken")  # as MLflow marks any log_model that raised
    assert sorted(status) == ["checkpoint", "ddp", "final"]  # the first checkpoint fell to keep_last=1
    assert client.get_logged_model(second_id).tags["mlflow_lance.checkpoint.step"] == str(W.STEPS_BEFORE + 1)
    assert len(store.versions(tmp_path / "ckpt.lance")) == 2  # the checkpoints' own dataset, from file://
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)

    plain = ml.load_model(second_uri)  # one process, no process group: the whole model
    assert type(plain).__name__ == "Tiny"
    assert all(raw(plain.state_dict()[k]) == raw(v) for k, v in reference["model"].items())
    model, opt = W.Tiny(), None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = checkpoint.load_checkpoint(second_uri, model, opt, restore_rng=False)
    assert state["step"] == W.STEPS_BEFORE + 1
    assert all(raw(model.state_dict()[k]) == raw(v) for k, v in reference["model"].items())
    named = reference["optimizer"]["state"]
    for i, fqn in enumerate(n for n, _ in model.named_parameters()):
        assert all(raw(opt.state_dict()["state"][i][k]) == raw(v) for k, v in named[fqn].items()), fqn
    model_id, model_uri, registered_version = got["model"]
    final = ml.load_model(f"models:/dist-model/{registered_version}")
    assert client.get_model_version("dist-model", str(registered_version)).run_id == run_id
    assert client.get_logged_model(model_id).name == "final"
    after = torch.load(tmp_path / "after.pt", weights_only=True)
    assert all(raw(final.state_dict()[k]) == raw(v) for k, v in after["model"].items())  # logged after that step
    ddp = ml.load_model(got["ddp"])  # DDP: the wrapped module, its replicated weights written once
    expected = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert type(ddp).__name__ == "Tiny" and all(raw(ddp.state_dict()[k]) == raw(v) for k, v in expected.items())


# --------------------------------------------------------------------------- object storage


def test_ranks_put_their_shards_to_s3_and_one_commit_makes_the_version(tmp_path, s3_server):
    env = s3_server["env"]
    opts = {
        "aws_endpoint": s3_server["endpoint"],
        "allow_http": "true",
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "aws_region": env["AWS_DEFAULT_REGION"],
    }
    uri = f"s3://{s3_server['bucket']}/distributed/{tmp_path.name}.lance"
    W.run(W.on_s3, 2, str(tmp_path), uri, opts)
    got = [_read(tmp_path, f"s3_{r}.json") for r in range(2)]
    assert got[0] == got[1] and got[0]["versions"] == [1, 2] and got[0]["loaded"] == []
    listed = s3_server["client"].list_objects_v2(
        Bucket=s3_server["bucket"], Prefix=f"distributed/{tmp_path.name}.lance/data/"
    )
    assert len(listed["Contents"]) >= 2 * 2  # each rank PUT its own file(s), twice
    reference = torch.load(tmp_path / "s3.pt", weights_only=True)
    whole = store.read_state_dict(uri, storage_options=opts)  # one process: the whole tensors
    assert all(raw(whole["model"][k]) == raw(v) for k, v in reference["model"].items())


def test_frozen_shards_are_written_once_per_run(tmp_path):
    W.run(W.frozen, 2, str(tmp_path), str(tmp_path / "frozen.lance"))
    got = _read(tmp_path, "frozen.json")
    frozen = ("model/emb.", "model/blocks.0.")
    changed = [n for n in got["changed"] if n.startswith("model/")]
    assert changed and not any(n.startswith(frozen) for n in changed), changed  # no frozen shard again
    assert got["second"] < got["first"], got
