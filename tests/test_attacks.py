"""Untrusted inputs, second round: what one crafted dataset or model directory can make a
routine command do to *other* data, and to the process.

Families (numbered as in the issue that reported them): 1 gc and sync delete nothing outside
their dataset, whatever links it holds, even links swapped in while gc runs; 2 special files
(FIFOs) never hang a load, a listing or the CLI; 4 no load allocates more than the files
hold (overlapping chunks, zstd ratios, a factory's shapes); 5 a planted MLmodel cannot turn a
dataset into a model directory; 6 nothing leaks the content of a file that fails to parse,
and links out of a model directory or dataset are refused; 8 every bad input is the
package's error naming the file. Family 3 (flipped bytes) is tests/test_byteflip.py, family
7 (terminal escapes) tests/test_cli_untrusted.py. Every case is real: datasets written by
the package, then edited on disk as an attacker with write access to them would.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import lance
import pytest
import torch
import yaml
import zstandard
from corpus import record

import mlflow_lance as ml
from conftest import in_subprocess
from mlflow_lance import cleanup, format, store, tensors
from mlflow_lance.cli import main as cli
from mlflow_lance.tensors import hash_bytes

HERE = Path(__file__).resolve().parent
OLD = time.time() - 3 * 3600  # an mtime past any grace period used here


def two_versions(uri: Path, seed: int) -> dict[str, torch.Tensor]:
    """A dataset with two versions (the second changes one tensor); the latest state dict."""
    torch.manual_seed(seed)
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64), "s": torch.randn(3)}
    ml.save_state_dict(sd, uri)
    sd = {**sd, "b": sd["b"] + 1}
    ml.save_state_dict(sd, uri)
    return sd


def age(root: Path) -> None:
    """Make every file under ``root`` look old (so that no grace period protects it)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (OLD, OLD))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def loads(uri: Path, sd: dict[str, torch.Tensor]) -> bool:
    got = ml.load_state_dict(uri, verify=True)
    return list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.fixture
def victim(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, bytes]]:
    """Somebody else's dataset (old versions, an unrelated old file in its data/), and what it
    holds before the attack."""
    uri = tmp_path / "victim" / "theirs.lance"
    sd = two_versions(uri, 1)
    (uri / "data" / "notes.txt").write_text("not a Lance file, but theirs")
    age(uri)
    return uri, sd, snapshot(uri.parent)


def gc_cli(uri: Path) -> int:
    return cli(["gc", str(uri), "--keep-last", "1", "--grace-minutes", "0"])


def untouched(victim) -> None:
    uri, sd, before = victim
    assert snapshot(uri.parent) == before, "gc deleted or changed another dataset's files"
    assert loads(uri, sd)


# --------------------------------------------------------------------------- 1: gc outside


def test_1_gc_through_a_data_dir_linked_to_another_dataset_deletes_nothing_there(tmp_path, victim, capsys):
    shared = tmp_path / "shared.lance"
    two_versions(shared, 2)
    shutil.rmtree(shared / "data")
    (shared / "data").symlink_to(victim[0] / "data")
    assert gc_cli(shared) == 2
    assert "not a directory" in capsys.readouterr().err
    untouched(victim)
    with pytest.raises(ml.CorruptionError, match="not a directory"):
        store.prune(shared, keep_last=1, grace=timedelta(0))
    untouched(victim)
    record("r2-1 gc outside", "refused", 2)


def test_1_gc_of_a_directory_whose_versions_link_to_another_dataset_removes_none(tmp_path, victim):
    evil = tmp_path / "evil.lance"
    evil.mkdir()
    (evil / "_versions").symlink_to(victim[0] / "_versions")
    assert gc_cli(evil) == 2
    untouched(victim)
    record("r2-1 gc outside", "refused")


@pytest.mark.parametrize("linked", ["_mlflow_lance", "_mlflow_lance/index"])
def test_1_gc_index_cleanup_through_a_link_removes_nothing_there(tmp_path, linked):
    mine = tmp_path / "user"
    mine.mkdir()
    for name in ("1.json", "7.json", "x.tmp", "keep.txt"):
        (mine / name).write_text("the user's own file")
    (mine / "index").mkdir()
    (mine / "index" / "1.json").write_text("the user's own file")
    age(mine)
    before = snapshot(mine)
    shared = tmp_path / "shared.lance"
    sd = two_versions(shared, 3)
    shutil.rmtree(shared / linked)
    (shared / linked).symlink_to(mine if linked == "_mlflow_lance/index" else mine)
    assert gc_cli(shared) == 2
    assert snapshot(mine) == before
    assert loads(shared, sd)  # the dataset itself still loads (its index is ignored)
    record("r2-1 gc outside", "refused")


def test_1_a_link_swapped_in_while_gc_runs_is_never_followed(tmp_path, victim, monkeypatch):
    """The attacker replaces data/ by a link after gc checked the dataset, before it deletes."""
    shared = tmp_path / "shared.lance"
    sd = two_versions(shared, 4)
    orphan = shared / "data" / "orphan.lance"
    orphan.write_bytes(b"left by a killed save")
    age(shared)
    tracked = cleanup._tracked

    def swap_then_track(dataset, min_version=None):
        out = tracked(dataset, min_version)
        if min_version is None and not (shared / "data").is_symlink():
            (shared / "data").rename(shared / "data.moved")
            (shared / "data").symlink_to(victim[0] / "data")
        return out

    monkeypatch.setattr(cleanup, "_tracked", swap_then_track)
    report = store.prune(shared, keep_last=1, grace=timedelta(0))
    untouched(victim)
    assert report.removed_versions == [1] and report.orphan_files == 1
    assert not (shared / "data.moved" / orphan.name).exists()  # deleted where it was, inside the dataset
    (shared / "data").unlink()
    (shared / "data.moved").rename(shared / "data")
    assert loads(shared, sd)
    record("r2-1 gc outside", "correct")


def test_1_a_manifest_naming_files_outside_makes_gc_delete_nothing_there(tmp_path, victim):
    """A doomed version whose manifest names another dataset's data file: loads refuse it,
    and gc never deletes a path that is not a plain name in the dataset's own data/."""
    import dataclasses

    from lance.fragment import DataFile

    shared = tmp_path / "shared.lance"
    sd = two_versions(shared, 5)
    ds = lance.dataset(str(shared))
    target = next((victim[0] / "data").glob("*.lance"))
    escape = os.path.relpath(target, shared / "data")
    frags = []
    for f in ds.get_fragments():
        old = f.metadata.files[0]
        new = DataFile(
            escape,
            old.fields,
            old.column_indices,
            old.file_major_version,
            old.file_minor_version,
            old.file_size_bytes,
        )
        frags.append(dataclasses.replace(f.metadata, files=[new]))
        break
    txn = lance.Transaction(ds.version, lance.LanceOperation.Overwrite(ds.schema, frags))
    lance.LanceDataset.commit(str(shared), txn)
    props = dict(ds.read_transaction(ds.version).transaction_properties)  # version 2 again, on top
    good = [f.metadata for f in ds.get_fragments()]
    txn = lance.Transaction(
        ds.version + 1, lance.LanceOperation.Overwrite(ds.schema, good), transaction_properties=props
    )
    lance.LanceDataset.commit(str(shared), txn)  # the crafted version 3 is now an old one
    age(shared)
    report = store.prune(shared, keep_last=1, grace=timedelta(0))
    assert 3 in report.removed_versions
    untouched(victim)
    assert loads(shared, sd)
    record("r2-1 gc outside", "correct")


def test_1_gc_of_a_hard_linked_orphan_removes_only_the_datasets_name(tmp_path, victim):
    shared = tmp_path / "shared.lance"
    sd = two_versions(shared, 6)
    target = next((victim[0] / "data").glob("*.lance"))
    os.link(target, shared / "data" / "planted.lance")
    age(shared)
    report = store.prune(shared, keep_last=1, grace=timedelta(0))
    assert report.orphan_files == 1 and not (shared / "data" / "planted.lance").exists()
    untouched(victim)
    assert loads(shared, sd)
    record("r2-1 gc outside", "correct")


def test_1_gc_all_does_not_follow_a_dataset_link_under_the_lance_root(tracking, tmp_path, victim):
    root = Path(os.environ["MLFLOW_LANCE_ROOT"])
    (root / "models").mkdir(parents=True)
    (root / "models" / "alias.lance").symlink_to(victim[0])
    with __import__("mlflow").start_run():
        ml.log_model(torch.nn.Linear(2, 2), name="model")
    results = ml.gc(all=True, keep_last=1, grace=timedelta(0))
    assert not any("alias.lance" in r.dataset for r in results)
    untouched(victim)
    record("r2-1 gc outside", "refused")


# --------------------------------------------------------------------------- 2: special files


CALLS = """
import json, mlflow_lance as ml
from mlflow_lance.cli import main
out = {}
for name, call in CASES.items():
    try:
        call()
        out[name] = "returned"
    except Exception as err:
        out[name] = type(err).__name__ + ": " + str(err)[:300]
print(json.dumps(out))
"""


def refused_in_time(cases: str, what: str) -> dict:
    got = in_subprocess(f"CASES = {cases}\n" + CALLS)
    for name, result in got.items():
        assert result.startswith(("CorruptionError", "WeightsError", "VersionNotFoundError")) or result in (
            "returned",
        ), (name, result)
        record(f"r2-2 {what}", "refused" if result != "returned" else "correct")
    return got


def test_2_a_manifest_that_is_a_fifo_never_hangs(uri_pair):
    uri, _ = uri_pair
    manifest = next((uri / "_versions").glob("*.manifest"))
    manifest.unlink()
    os.mkfifo(manifest)
    u = str(uri)
    got = refused_in_time(
        f"""{{
        "load": lambda: ml.load_state_dict({u!r}),
        "load verify": lambda: ml.load_state_dict({u!r}, verify=True),
        "verify": lambda: ml.verify({u!r}),
        "versions": lambda: ml.versions({u!r}),
        "cli versions": lambda: main(["versions", {u!r}]) == 2 or 1 / 0,
        "cli verify": lambda: main(["verify", {u!r}]) in (1, 2) or 1 / 0,
    }}""",
        "fifo manifest",
    )
    assert "not a regular file" in got["load verify"] and "FIFO" in got["versions"]


def test_2_a_tag_file_that_is_a_fifo_never_hangs(uri_pair):
    uri, _ = uri_pair
    ml.tag(uri, "best", 1)
    tag = uri / "_refs" / "tags" / "best.json"
    tag.unlink()
    os.mkfifo(tag)
    u = str(uri)
    got = refused_in_time(
        f"""{{
        "versions": lambda: ml.versions({u!r}),
        "tags": lambda: ml.tags({u!r}),
        "load a tag": lambda: ml.load_state_dict({u!r}, "best"),
        "cli versions": lambda: main(["versions", {u!r}]) == 2 or 1 / 0,
    }}""",
        "fifo tag",
    )
    assert all("FIFO" in r for r in got.values() if r != "returned")


@pytest.mark.parametrize("which", ["data/lance.yaml", "MLmodel"])
def test_2_a_model_directory_file_that_is_a_fifo_never_hangs(tmp_path, which):
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(3, 2), str(path))
    (path / which).unlink()
    os.mkfifo(path / which)
    p = str(path)
    got = refused_in_time(
        f"""{{
        "load_model untrusted": lambda: ml.load_model({p!r}, allow_pickle=False),
        "load_model": lambda: ml.load_model({p!r}),
        "load_state_dict": lambda: ml.load_state_dict({p!r}),
    }}""",
        "fifo model file",
    )
    assert "not a regular file" in got["load_model untrusted"] and "not a regular file" in got["load_model"], got
    assert (
        got["load_state_dict"] == "returned" if which == "MLmodel" else "not a regular file" in got["load_state_dict"]
    )


@pytest.fixture
def uri_pair(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    uri = tmp_path / "w.lance"
    return uri, two_versions(uri, 7)


# --------------------------------------------------------------------------- 4: amplification


def peak_rss_growth(code: str) -> dict:
    """Run ``code`` (which sets ``out``) after the imports; how far the peak RSS grew (MB)."""
    return in_subprocess(f"""
        import json, resource, torch, mlflow_lance as ml
        from mlflow_lance import store
        ml.load_state_dict  # imports done
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        {textwrap.indent(textwrap.dedent(code), " " * 8).strip()}
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps({{"out": out, "grown_mb": grown}}))
    """)


def chunked_index(uri: Path, chunks: int) -> None:
    """Rewrite the latest version's index: tensor ``w`` as ``chunks`` rows that all point at
    the same stored bytes, with the digest among the index's properties made to match (what
    a forger who can write the directory does)."""
    path = next((uri / "_mlflow_lance" / "index").glob(f"{lance.dataset(str(uri)).version}.json"))
    doc = json.loads(path.read_text())
    first = doc["rows"][0]  # w: 64 x 64 float32 in one 16 KiB row
    size = first[3] // 4
    n = len(tensors.META_COLUMNS)
    fake = [
        [
            first[0],
            i,
            i * size,
            size * chunks,
            "float32",
            [size * chunks // 4],
            first[6],
            None,
            first[n],
            size,
        ]
        for i in range(chunks)
    ]
    doc["rows"] = fake + doc["rows"][1:]
    doc["fragments"][0][2] = chunks
    doc["properties"]["mlflow_lance.rows"] = format.rows_digest(
        dict(zip(tensors.META_COLUMNS, r[:n], strict=True)) for r in doc["rows"]
    )
    path.write_text(json.dumps(doc))


def test_4_an_index_whose_chunks_all_point_at_the_same_bytes_allocates_nothing(uri_pair):
    uri, sd = uri_pair
    chunked_index(uri, 20_000)  # 20,000 x 4 KiB claimed over the same 4 KiB of file
    got = peak_rss_growth(f"""
        sd = ml.load_state_dict({str(uri)!r})
        out = {{k: list(v.shape) for k, v in sd.items()}}
    """)
    assert got["out"] == {k: list(v.shape) for k, v in sd.items()}  # the real rows, decoded instead
    assert got["grown_mb"] < 40, got
    record("r2-4 amplification", "correct")


def test_4_a_zstd_chunk_claiming_256_MiB_from_8_KiB_is_refused(tmp_path, monkeypatch):
    from test_untrusted import craft, row

    uri = tmp_path / "z.lance"
    ml.save_state_dict({"w": torch.randn(8)}, uri, compression="zstd")
    frame = zstandard.ZstdCompressor().compress(bytes(256 << 20))
    assert len(frame) < 16 << 10 and zstandard.frame_content_size(frame) == 256 << 20
    craft(uri, [row("w", frame, shape=[64 << 20], nbytes=256 << 20, hash=hash_bytes(bytes(256 << 20)))])
    with pytest.raises(ml.CorruptionError, match=r"claims 268435456 bytes from \d+ compressed ones, more than 1024x"):
        ml.load_state_dict(uri)
    assert not ml.verify(uri).ok
    monkeypatch.setenv("MLFLOW_LANCE_MAX_ZSTD_RATIO", str(1 << 20))  # the user trusts this dataset
    assert torch.count_nonzero(ml.load_state_dict(uri)["w"]) == 0
    record("r2-4 amplification", "refused")


def test_4_our_own_zstd_chunks_stay_within_the_ratio_and_round_trip(tmp_path):
    """A save of all-zero tensors keeps every chunk within the ratio a load accepts."""
    uri = tmp_path / "z.lance"
    sd = {
        "zeros": torch.zeros(1 << 20),
        "ones": torch.ones(70_000, dtype=torch.float16),
        "r": torch.randn(100),
        "empty": torch.zeros(0),
        "big": torch.zeros(3, 1 << 20),
    }
    ml.save_state_dict(sd, uri, compression="zstd")
    got = ml.load_state_dict(uri, verify=True)
    assert all(torch.equal(got[k], sd[k]) for k in sd) and ml.verify(uri).ok
    stored = sum(f.stat().st_size for f in (uri / "data").iterdir())
    assert stored < sum(t.numel() * t.element_size() for t in sd.values()) / 100  # still compressed


def test_4_a_factory_with_crafted_shapes_is_refused_before_it_allocates(tmp_path):
    path = tmp_path / "model"
    ml.save_model(
        torch.nn.Linear(4, 2),
        str(path),
        model_factory="torch.nn:Linear",
        factory_kwargs={"in_features": 4, "out_features": 2},
    )
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    mlmodel["flavors"]["mlflow_lance"]["factory_kwargs"] = {"in_features": 8192, "out_features": 8192}
    (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    got = peak_rss_growth(f"""
        try:
            ml.load_model({str(path)!r}, allow_pickle=False)
            out = "loaded"
        except RuntimeError as err:
            out = str(err)
    """)
    assert "size mismatch for weight" in got["out"] and got["grown_mb"] < 64, got
    record("r2-4 amplification", "refused")


# --------------------------------------------------------------------------- 5: what a path is


def test_5_a_planted_model_directory_cannot_turn_a_dataset_into_another(tmp_path):
    mine, other = tmp_path / "mine.lance", tmp_path / "other.lance"
    sd = two_versions(mine, 8)
    ml.save_state_dict({"w": torch.zeros(2)}, other)
    ml.save_model(torch.nn.Linear(2, 2), str(tmp_path / "model"), lance_uri=str(other))
    shutil.copy(tmp_path / "model" / "MLmodel", mine / "MLmodel")
    shutil.copytree(tmp_path / "model" / "data", mine / "data", dirs_exist_ok=True)  # data/lance.yaml too
    assert loads(mine, sd)  # its own tensors, checked
    assert ml.verify(mine).ok and ml.verify(mine).tensors == len(sd)
    with pytest.raises(ml.WeightsError, match="is a Lance dataset, not a model directory"):
        ml.load_model(str(mine))
    record("r2-5 planted model", "correct")


# --------------------------------------------------------------------------- 6: leaks and links

SECRET = "aws_secret_access_key = SUPERSECRET-do-not-print\n[default]\n: : {{{\n"


@pytest.mark.parametrize("how", ["linked", "copied"])
def test_6_a_pointer_that_fails_to_parse_never_shows_its_content(tmp_path, how):
    secret = tmp_path / "credentials"
    secret.write_text(SECRET)
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(path))
    pointer = path / "data" / "lance.yaml"
    pointer.unlink()
    if how == "linked":
        pointer.symlink_to(secret)
    else:
        shutil.copy(secret, pointer)
    for call in (lambda: ml.load_model(str(path)), lambda: ml.load_state_dict(path)):
        with pytest.raises(ml.CorruptionError) as info:
            call()
        assert "SUPERSECRET" not in str(info.value) and "lance.yaml" in str(info.value)
        record("r2-6 leak", "refused")


@pytest.mark.parametrize("where", ["MLmodel", "data/skeleton.pkl"])
def test_6_a_model_directory_file_linked_out_is_refused(tmp_path, where):
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(path))
    outside = tmp_path / "outside"
    shutil.copy(path / where, outside)
    (path / where).unlink()
    (path / where).symlink_to(outside)
    with pytest.raises(ml.CorruptionError, match="symbolic link|not a regular file"):
        ml.load_model(str(path))
    record("r2-6 link", "refused")


@pytest.mark.parametrize("name", ["../../outside.pkl", "/etc/passwd", "data/../../x.pkl"])
def test_6_an_architecture_path_out_of_the_model_directory_is_refused(tmp_path, name):
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(path))
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    mlmodel["flavors"]["mlflow_lance"]["skeleton"] = name
    (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(ml.CorruptionError, match="not a file inside the model directory"):
        ml.load_model(str(path))
    record("r2-6 link", "refused")


@pytest.mark.parametrize("which", ["manifest", "tag"])
def test_6_a_manifest_or_tag_linked_out_of_the_dataset_is_refused(uri_pair, tmp_path, which):
    uri, _ = uri_pair
    if which == "tag":
        ml.tag(uri, "best", 1)
    victim = next((uri / "_versions").glob("*.manifest")) if which == "manifest" else uri / "_refs/tags/best.json"
    shutil.copy(victim, tmp_path / "outside")
    victim.unlink()
    victim.symlink_to(tmp_path / "outside")
    with pytest.raises(ml.CorruptionError, match="a symbolic link, not a regular file"):
        ml.versions(uri)
    record("r2-6 link", "refused")


# --------------------------------------------------------------------------- 8: errors that name the problem


@pytest.mark.parametrize(
    "text",
    [
        b"\x00\x01binary",
        b"lance_uri: [unclosed",
        b"lance_uri: x\nlance_version: " + str(10**30).encode(),
        b"lance_uri: 7\nlance_version: -1",
    ],
)
def test_8_a_malformed_pointer_is_a_corruption_error_naming_it(tmp_path, text):
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(path))
    (path / "data" / "lance.yaml").write_bytes(text)
    with pytest.raises(ml.CorruptionError, match="lance.yaml"):
        ml.load_model(str(path))
    record("r2-8 error", "refused")


@pytest.mark.parametrize("edit", ["no architecture", "two architectures", "skeleton not a string", "not a mapping"])
def test_8_a_malformed_mlmodel_is_a_corruption_error_naming_it(tmp_path, edit):
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(path))
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    conf = mlmodel["flavors"]["mlflow_lance"]
    if edit == "no architecture":
        del conf["skeleton"]
    elif edit == "two architectures":
        conf["torchscript"] = "data/skeleton.pkl"
    elif edit == "skeleton not a string":
        conf["skeleton"] = ["data", "skeleton.pkl"]
    else:
        mlmodel = ["a", "list"]
    (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(ml.CorruptionError, match="MLmodel"):
        ml.load_model(str(path))
    record("r2-8 error", "refused")


@pytest.mark.parametrize("rng", ["missing", "a string", "wrong keys", "wrong sizes"])
def test_8_a_crafted_checkpoint_gives_a_clear_error(tmp_path, rng):
    """read by load_checkpoint: no KeyError or AttributeError, and no generator changed."""
    from mlflow_lance.checkpoint import load_checkpoint

    path = tmp_path / "model"
    net = torch.nn.Linear(2, 2)
    ml.save_model(net, str(path))
    good = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": "MT19937",
            "keys": torch.zeros(624, dtype=torch.int64),
            "pos": 0,
            "has_gauss": 0,
            "cached": 0.0,
        },
        "python": {"version": 3, "internal": [0] * 625, "gauss_next": None},
    }
    state = {
        "missing": None,
        "a string": "x",
        "wrong keys": {"torch": good["torch"]},
        "wrong sizes": {**good, "numpy": {**good["numpy"], "keys": torch.zeros(3, dtype=torch.int64)}},
    }[rng]
    tree = {"model": {k: v.detach().clone() for k, v in net.state_dict().items()}, "step": 3}
    if state is not None:
        tree["rng"] = state
    info = ml.save_state_dict(tree, path / "data" / "weights.lance")
    pointer = yaml.safe_load((path / "data" / "lance.yaml").read_text())
    (path / "data" / "lance.yaml").write_text(yaml.safe_dump({**pointer, "lance_version": info.version}))
    before = torch.get_rng_state()
    with pytest.raises(ml.WeightsError, match="rng"):
        load_checkpoint(str(path), net)
    assert torch.equal(torch.get_rng_state(), before)
    assert load_checkpoint(str(path), net, restore_rng=False)["step"] == 3
    record("r2-8 error", "refused")


def test_8_a_malformed_tag_file_is_a_usage_error_not_a_bug(uri_pair, capsys):
    uri, _ = uri_pair
    ml.tag(uri, "best", 1)
    (uri / "_refs" / "tags" / "best.json").write_bytes(b"{not json")
    assert cli(["versions", str(uri)]) == 2
    assert "tags" in capsys.readouterr().err
    record("r2-8 error", "refused")


def test_8_a_version_out_of_range_is_not_found(uri_pair):
    uri, _ = uri_pair
    for v in (10**30, -1, 1 << 63):
        with pytest.raises(ml.VersionNotFoundError):
            ml.load_state_dict(uri, v)
    record("r2-8 error", "refused", 3)


# --------------------------------------------------------------------------- a third look (a fresh attacker's finds)


@pytest.mark.parametrize("where", ["models", "experiments/0/checkpoints"])
def test_1_gc_all_follows_no_link_on_the_way_down_from_a_lance_root(tracking, tmp_path, where):
    """A link one level above a dataset (the root's models/ or a checkpoints/ folder) leads
    to someone else's datasets: gc --all neither lists nor touches them."""
    theirs = tmp_path / "victim" / "team"
    theirs.mkdir(parents=True)
    sd = two_versions(theirs / "v.lance", 11)
    age(theirs)
    before = snapshot(theirs)
    link = Path(os.environ["MLFLOW_LANCE_ROOT"]) / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(theirs)
    assert cli(["gc", "--all", "--keep-last", "1", "--grace-minutes", "0"]) == 0
    assert snapshot(theirs) == before and loads(theirs / "v.lance", sd)
    record("r2-1 gc outside", "refused")


def test_1_an_mlmodel_naming_another_dataset_gets_no_keep_last_there(tracking, tmp_path):
    """A model version whose (editable) MLmodel names a dataset outside every Lance root: gc
    --all --keep-last never applies its policy there (MLflow logged none of its versions)."""
    import mlflow

    admin = tmp_path / "private" / "admin.lance"
    sd = two_versions(admin, 12)
    age(admin.parent)
    with mlflow.start_run():
        info = ml.log_model(torch.nn.Linear(2, 2), name="innocent")
    (path,) = Path(tracking["root"], "artifacts").rglob(f"{info.model_id}/artifacts/MLmodel")  # as stored
    mlmodel = yaml.safe_load(path.read_text())
    mlmodel["flavors"]["mlflow_lance"].update(lance_uri=str(admin), lance_version=1)
    path.write_text(yaml.safe_dump(mlmodel))
    mlflow.register_model(f"models:/{info.model_id}", f"innocent-{tmp_path.name}")
    ml.gc(all=True, keep_last=1, grace=timedelta(0))
    assert [v.version for v in ml.versions(admin)] == [1, 2] and loads(admin, sd)
    record("r2-1 gc outside", "refused")


def test_2_a_deletion_file_that_is_a_fifo_never_hangs(tmp_path):
    uri = tmp_path / "packed.lance"
    ml.save_state_dict({"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(4)}, uri)  # one packed data file
    lance.dataset(str(uri)).delete("name = 'b'")  # a commit with a deletion file (Lance's, not ours)
    victim = next((uri / "_deletions").iterdir())
    victim.unlink()
    os.mkfifo(victim)
    u = str(uri)
    got = refused_in_time(
        f"""{{
        "load": lambda: ml.load_state_dict({u!r}),
        "versions": lambda: ml.versions({u!r}),
        "verify": lambda: ml.verify({u!r}),
    }}""",
        "fifo deletion file",
    )
    assert "FIFO" in got["load"]


def test_4_a_sidecar_of_aliases_is_refused_at_once(tmp_path):
    """YAML aliases let 0.4 MB stand for a billion entries: a sidecar with any alias is not
    parsed (it is rebuilt from the commits), so a load by run id stays fast."""
    uri = tmp_path / "runs.lance"
    ml.save_state_dict({"w": torch.ones(4)}, uri, properties={"mlflow.run_id": "r1"})
    fan = "d: &d {}\nL: &L [" + ",".join(["*d"] * 30000) + "]\nruns: {" + ",".join(f"k{i}: *L" for i in range(30000))
    (tmp_path / "runs.lance.yaml").write_text(
        "lance_latest_version: 1\nlogged_models: {}\nregistered_models: {}\npins: {}\n" + fan + "}\n"
    )
    started = time.monotonic()
    assert torch.equal(ml.load_state_dict(uri, run_id="r1")["w"], torch.ones(4))
    assert time.monotonic() - started < 120  # expanded, it would take hours: a bound for that, not a pace
    record("r2-4 amplification", "correct")


@pytest.mark.parametrize("shape", [[1 << 30], [(1 << 62) - 1, (1 << 62) - 1]])
def test_4_a_docs_example_row_claiming_a_shape_it_does_not_hold_allocates_nothing(tmp_path, shape, capsys):
    import pyarrow as pa

    uri = tmp_path / "docs_example.lance"
    table = pa.table(
        {
            "name": ["w"],
            "value": pa.array([[1.0, 2.0]], pa.list_(pa.float64())),
            "shape": pa.array([shape], pa.list_(pa.int64())),
        }
    )
    lance.write_dataset(table, str(uri))
    with pytest.raises(ml.CorruptionError, match="holds 2 values"):
        ml.load_state_dict(uri)
    assert not ml.verify(uri).ok
    assert cli(["verify", str(uri)]) == 1 and cli(["export", str(uri), str(tmp_path / "x.safetensors")]) == 2
    record("r2-4 amplification", "refused", 2)


SPEC_LIES = {
    "a float too large": {"t": "f", "v": 10**400},
    "a float that is text": {"t": "f", "v": "abc"},
    "a tensor name that is a list": {"t": "tensor", "n": ["x"]},
    "an unknown node": {"t": "nope"},
}


@pytest.mark.parametrize("lie", sorted(SPEC_LIES))
def test_8_a_crafted_checkpoint_spec_in_the_index_is_a_corruption_error(tmp_path, lie):
    uri = tmp_path / "tree.lance"
    ml.save_state_dict({"model": {"w": torch.ones(2)}, "epoch": 1.5}, uri)
    path = uri / "_mlflow_lance" / "index" / "1.json"
    doc = json.loads(path.read_text())
    spec = json.loads(doc["properties"]["mlflow_lance.tree"])
    spec["root"]["v"][1][1] = SPEC_LIES[lie]  # the "epoch" entry
    doc["properties"]["mlflow_lance.tree"] = json.dumps(spec)
    path.write_text(json.dumps(doc))  # the rows digest does not cover the spec: the index is read alone
    try:
        got = ml.load_state_dict(uri)
    except ml.CorruptionError as err:
        assert "mlflow_lance.tree" in str(err) and str(uri) in str(err)
        record("r2-8 error", "refused")
    else:
        assert got["epoch"] == 1.5  # (or the index was not believed)
        record("r2-8 error", "correct")


def test_8_rng_and_optimizer_hyperparameters_of_the_wrong_kind_are_refused(tmp_path):
    from mlflow_lance.checkpoint import load_checkpoint, set_rng_state

    good = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": "MT19937",
            "keys": torch.zeros(624, dtype=torch.int64),
            "pos": 0,
            "has_gauss": 0,
            "cached": 10**400,
        },
        "python": {"version": 3, "internal": [0] * 625, "gauss_next": None},
    }
    with pytest.raises(ml.CorruptionError, match="rng state is malformed"):
        set_rng_state(good)
    path = tmp_path / "model"
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ml.save_model(net, str(path))
    named = {
        "state": {},
        "param_groups": [{**opt.state_dict()["param_groups"][0], "lr": "x", "params": ["weight", "bias"]}],
    }
    info = ml.save_state_dict(
        {"model": dict(net.state_dict()), "step": 1, "optimizer": named}, path / "data" / "weights.lance"
    )
    (path / "data" / "lance.yaml").write_text(
        yaml.safe_dump({"lance_uri": "weights.lance", "lance_version": info.version})
    )
    with pytest.raises(ml.CorruptionError, match=r"hyperparameters \['lr'\]"):
        load_checkpoint(str(path), net, opt, restore_rng=False)
    assert opt.param_groups[0]["lr"] == 0.1
    record("r2-8 error", "refused", 2)


def test_4_an_index_of_tiny_objects_is_not_parsed(uri_pair):
    uri, sd = uri_pair
    path = uri / "_mlflow_lance" / "index" / f"{lance.dataset(str(uri)).version}.json"
    path.write_text('{"index_format":2,"version":2,"rows":[' + ",".join(["{}"] * ((15 << 20) // 3)) + "]}")
    got = peak_rss_growth(f"""
        out = sorted(ml.load_state_dict({str(uri)!r}))
    """)
    assert got["out"] == sorted(sd) and got["grown_mb"] < 100, got
    record("r2-4 amplification", "correct")


def test_1_an_index_folder_swapped_for_a_link_while_it_is_written_gets_nothing(tmp_path, monkeypatch):
    from mlflow_lance import fs

    uri = tmp_path / "one.lance"
    ml.save_state_dict({"w": torch.ones(3)}, uri)
    shutil.rmtree(uri / "_mlflow_lance")
    mine = tmp_path / "user-files"
    mine.mkdir()
    write = fs.Tree.write

    def swap_then_write(self, sub, name, data, *, sync=True):
        self._dir(sub, create=True)  # the folder is open: now the attacker swaps it for a link
        (uri / "_mlflow_lance" / "index").rename(tmp_path / "moved")
        (uri / "_mlflow_lance" / "index").symlink_to(mine)
        return write(self, sub, name, data, sync=sync)

    monkeypatch.setattr(fs.Tree, "write", swap_then_write)
    assert store.reindex(uri) == [1]
    assert list(mine.iterdir()) == [] and (tmp_path / "moved" / "1.json").exists()
    monkeypatch.undo()
    with pytest.raises(ml.CorruptionError, match="symbolic link"):
        store.reindex(uri)  # a folder that is a link already: refused, nothing written there
    assert list(mine.iterdir()) == []
    record("r2-1 gc outside", "refused", 2)


def test_8_smaller_errors_name_the_problem(tmp_path, uri_pair, capsys):
    uri, _ = uri_pair
    with pytest.raises(ValueError, match="tag name '../../x' is not allowed"):
        ml.load_state_dict(uri, "../../x")
    cplx = tmp_path / "c.lance"
    ml.save_state_dict({"z": torch.randn(3, dtype=torch.complex128), "r": torch.randn(2)}, cplx)
    assert cli(["export", str(cplx), str(tmp_path / "c.safetensors")]) == 2
    assert "safetensors cannot store z (torch.complex128)" in capsys.readouterr().err
    path = tmp_path / "model"
    ml.save_model(torch.nn.Linear(2, 2), str(path))
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    mlmodel["flavors"]["mlflow_lance"]["code"] = "../.."
    mlmodel["flavors"]["mlflow_lance"]["pytorch_version"] = "\x1b]52;c;evil\x07"
    (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(ml.CorruptionError, match="not a file inside the model directory"):
        ml.load_model(str(path))
    record("r2-8 error", "refused", 3)
