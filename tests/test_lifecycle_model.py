"""Model-based test of the lifecycle: seeded random sequences of real MLflow operations,
interleaved with sync, gc (grace 0), `mlflow gc`, a log_model racing gc and a gc inside a sync, against an oracle
of the exact weights every live reference must load and of the versions gc must reclaim.

Run against a real `mlflow server` on SQLite and on PostgreSQL (a throwaway cluster). The
invariants are checked after every gc:

- every logged model MLflow still lists loads its exact weights (through MLflow and Lance);
- every model version that exists keeps its exact weights in Lance, and loads through
  MLflow while MLflow still has its files;
- every Lance version nothing references is gone, except each dataset's latest, and so is
  every data file no surviving version uses.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import dist_workers as W
import lance
import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_lance as ml
from conftest import report, running_mlflow_server, running_postgres
from mlflow_lance import cleanup, store

BIN = Path(sys.executable).parent
STEPS = int(os.environ.get("MLFLOW_LANCE_MODEL_STEPS", "200"))


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    net.load_state_dict(sd)
    return net


@dataclass
class Logged:
    model_id: str
    run_id: str
    uri: str
    version: int
    weights: dict[str, torch.Tensor]
    deleted: bool = False
    purged: bool = False
    checkpoint: bool = False  # a distributed checkpoint: its weights are its "model" subtree


class World:
    """The oracle: what MLflow holds, and so what must load."""

    def __init__(self, rng: random.Random, server: dict, ranks: "Ranks"):
        self.rng, self.server, self.client, self.ranks = rng, server, MlflowClient(), ranks
        self.models: dict[str, Logged] = {}
        self.versions: dict[tuple[str, str], str] = {}  # (registered name, version) -> model id
        self.runs: dict[str, str] = {}  # run id -> active | deleted | purged
        self.names: list[str] = []
        self.fresh = 0
        self.counts: dict[str, int] = {}
        self.checked = 0
        self.lost: list[str] = []  # references that did not load their weights
        self.inside_gc = 0  # registry operations made inside gc's steps
        self.bytes_reclaimed = 0
        self.versions_reclaimed = 0
        self.last_weights = weights(0)

    # ------------------------------------------------------------------ helpers
    def _new_weights(self) -> dict[str, torch.Tensor]:
        if self.rng.random() < 0.5:  # only the head's bias changes: dedup against history
            sd = {k: v.clone() for k, v in self.last_weights.items()}
            sd["2.bias"] += self.rng.randint(1, 9)
        else:
            sd = weights(self.rng.randint(1, 10**6))
        self.last_weights = sd
        return sd

    def _name(self, existing_only: bool = False) -> str | None:
        if existing_only:
            return self.rng.choice(self.names) if self.names else None
        if self.names and self.rng.random() < 0.75:
            return self.rng.choice(self.names)
        self.fresh += 1
        return f"m{self.fresh}"

    def _log(self, run_id: str, registered: str | None, step: int) -> None:
        sd = self._new_weights()
        info = ml.log_model(
            module(sd),
            name=self.rng.choice(["model", "model", "head"]),
            registered_model_name=registered,
            step=step,
        )
        conf = info.flavors["mlflow_lance"]
        self.models[info.model_id] = Logged(info.model_id, run_id, conf["lance_uri"], conf["lance_version"], sd)
        if registered:
            if registered not in self.names:
                self.names.append(registered)
            self.versions[(registered, str(info.registered_model_version))] = info.model_id

    def _live_models(self) -> list[Logged]:
        return [m for m in self.models.values() if not m.deleted]

    # ------------------------------------------------------------------ operations
    def op_log(self) -> None:
        registered = self._name() if self.rng.random() < 0.7 else None
        with mlflow.start_run() as run:
            self.runs[run.info.run_id] = "active"
            for step in range(self.rng.choice([1, 1, 2, 3])):  # several checkpoints per run
                self._log(run.info.run_id, registered, step)

    def op_register_later(self) -> None:
        live = self._live_models()
        if not live:
            return
        m = self.rng.choice(live)
        name = self._name()
        mv = mlflow.register_model(f"models:/{m.model_id}", name)
        if name not in self.names:
            self.names.append(name)
        self.versions[(name, str(mv.version))] = m.model_id

    def op_copy(self) -> None:
        if not self.versions:
            return
        (src_name, src_version), model_id = self.rng.choice(sorted(self.versions.items()))
        dst = self._name()
        mv = self.client.copy_model_version(f"models:/{src_name}/{src_version}", dst)
        if dst not in self.names:
            self.names.append(dst)
        self.versions[(dst, str(mv.version))] = model_id

    def op_rename(self) -> None:
        name = self._name(existing_only=True)
        if name is None:
            return
        self.fresh += 1
        new = f"{name.split('~')[0]}~r{self.fresh}"
        self.client.rename_registered_model(name, new)
        self.names[self.names.index(name)] = new
        self.versions = {((new if n == name else n), v): mid for (n, v), mid in self.versions.items()}

    def op_alias_or_stage(self) -> None:
        if not self.versions:
            return
        name, version = self.rng.choice(sorted(self.versions))
        if self.rng.random() < 0.5:
            self.client.set_registered_model_alias(name, self.rng.choice(["champion", "challenger"]), version)
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.client.transition_model_version_stage(name, version, self.rng.choice(["Staging", "Production"]))

    def _move_run(self, source: str, target: str, action) -> None:
        candidates = [r for r, state in self.runs.items() if state == source]
        if candidates:
            run_id = self.rng.choice(candidates)
            action(run_id)
            self.runs[run_id] = target

    def op_delete_run(self) -> None:
        self._move_run("active", "deleted", self.client.delete_run)

    def op_restore_run(self) -> None:
        self._move_run("deleted", "active", self.client.restore_run)

    def op_delete_model_version(self) -> None:
        if self.versions:
            name, version = self.rng.choice(sorted(self.versions))
            self.client.delete_model_version(name, version)
            del self.versions[(name, version)]

    def op_delete_registered_model(self) -> None:
        name = self._name(existing_only=True)
        if name is not None and self.rng.random() < 0.5:
            self.client.delete_registered_model(name)
            self.names.remove(name)
            self.versions = {k: v for k, v in self.versions.items() if k[0] != name}

    def op_delete_logged_model(self) -> None:
        live = self._live_models()
        if live:
            m = self.rng.choice(live)
            self.client.delete_logged_model(m.model_id)
            m.deleted = True

    def op_mlflow_gc(self) -> None:
        subprocess.run(
            [
                str(BIN / "mlflow"),
                "gc",
                "--backend-store-uri",
                self.server["backend"],
                "--artifacts-destination",
                str(self.server["root"] / "artifacts"),
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
        for m in self.models.values():
            if m.deleted:
                m.purged = True
        for run_id, state in self.runs.items():
            if state == "deleted":
                self.runs[run_id] = "purged"

    def op_sync(self) -> None:
        name = self._name(existing_only=True)
        if name is not None and self.rng.random() < 0.6:
            try:
                ml.sync(name)
            except LookupError:
                assert not any(k[0] == name for k in self.versions)  # no mlflow_lance version
        else:
            ml.sync(all=True)

    def op_gc(self) -> None:
        results = ml.gc(all=True, grace=timedelta(0))
        self.bytes_reclaimed += sum(r.bytes_removed for r in results)
        self.versions_reclaimed += sum(len(r.removed_versions) for r in results)
        self.check()

    def op_gc_with_registry_races(self) -> None:
        """gc with registry operations made inside its own steps: between its reads of MLflow,
        between its pin changes and right before it deletes files. Every reference made
        before its delete step must load afterwards; what was released meanwhile is reclaimed
        by a later gc (checked by the next quiet one)."""
        inside = [
            "op_register_later",
            "op_copy",
            "op_delete_logged_model",
            "op_delete_model_version",
            "op_rename",
            "op_alias_or_stage",
            "op_delete_run",
            "op_restore_run",
            "op_delete_registered_model",
        ]
        busy, done = [False], []

        def interleave() -> None:
            if busy[0] or len(done) >= 6 or self.rng.random() > 0.3:
                return
            busy[0] = True
            try:
                op = self.rng.choice(inside)
                getattr(self, op)()
                done.append(op)
            finally:
                busy[0] = False

        def hooked(owner: object, name: str) -> tuple[object, str, object]:
            original = getattr(owner, name)

            def call(*args, **kwargs):
                interleave()
                return original(*args, **kwargs)

            setattr(owner, name, call)
            return owner, name, original

        steps = [
            (MlflowClient, n)
            for n in (
                "get_logged_model",
                "get_run",
                "search_model_versions",
                "get_model_version",
                "search_registered_models",
                "get_registered_model",
                "get_model_version_download_uri",
            )
        ]
        steps += [(store, "tag"), (store, "untag"), (cleanup, "_tracked")]
        restore = [hooked(owner, name) for owner, name in steps]
        try:
            results = ml.gc(all=True, grace=timedelta(0))
        finally:
            for owner, name, original in restore:
                setattr(owner, name, original)
        self.inside_gc += len(done)
        for op in done:
            self.counts[f"{op} inside gc"] = self.counts.get(f"{op} inside gc", 0) + 1
        self.bytes_reclaimed += sum(r.bytes_removed for r in results)
        self.versions_reclaimed += sum(len(r.removed_versions) for r in results)
        self.check_references()

    def op_log_while_gc(self) -> None:
        """A log_model in another thread while gc runs (grace 0): neither loses anything."""
        errors: list[BaseException] = []
        registered = self._name()

        def writer() -> None:
            try:
                with mlflow.start_run() as run:
                    self.runs[run.info.run_id] = "active"
                    self._log(run.info.run_id, registered, 0)
            except BaseException as err:  # noqa: BLE001 (re-raised below)
                errors.append(err)

        t = threading.Thread(target=writer)
        t.start()
        results = ml.gc(all=True, grace=timedelta(0))
        t.join()
        assert not errors, errors
        self.bytes_reclaimed += sum(r.bytes_removed for r in results)
        self.versions_reclaimed += sum(len(r.removed_versions) for r in results)
        self.op_gc()

    def op_sync_while_gc(self) -> None:
        """sync of every dataset with a gc (grace 0) of the dataset it is reading made inside
        it, right after its listing of that dataset's versions and before it reads their
        commits (hooked, so the interleaving is exact: what `sync --all` met beside a gc on
        a real server). The versions the gc removed are gone, not "damaged or crafted": sync
        finishes, and neither loses anything."""
        self.op_delete_logged_model()  # most often leaves a version for the gc to remove
        real, busy, collected = store.version_list, [False], set()

        def listing(ds):
            listed = real(ds)
            if busy[0] or ds.uri in collected:
                return listed
            busy[0] = True
            try:  # the gc beside, once per dataset (its own listings pass through)
                collected.add(ds.uri)
                for r in ml.gc(ds.uri, grace=timedelta(0)):
                    self.bytes_reclaimed += r.bytes_removed
                    self.versions_reclaimed += len(r.removed_versions)
                    self.counts["versions gc removed inside sync"] = self.counts.get(
                        "versions gc removed inside sync", 0
                    ) + len(r.removed_versions)
                    under = len(set(r.removed_versions) & {v["version"] for v in listed})  # sync reads these next
                    self.counts["versions gc removed under sync's listing"] = (
                        self.counts.get("versions gc removed under sync's listing", 0) + under
                    )
            finally:
                busy[0] = False
            return listed

        store.version_list = listing
        try:
            ml.sync(all=True)
        finally:
            store.version_list = real
        self.check_references()

    def op_distributed_checkpoints(self) -> None:
        """Two ranks of an FSDP2 job log 1 to 3 checkpoints to a new run (blocking or not,
        with or without retention): one logged model per checkpoint, one version each."""
        states = [self._new_weights() for _ in range(self.rng.choice([1, 2, 3]))]
        keep_last = self.rng.choice([None, 1, 2])
        answers = self.ranks.ask(
            ([{k: v.numpy() for k, v in sd.items()} for sd in states], keep_last, self.rng.random() < 0.5)
        )
        for model_id, run_id, uri, version, deleted in answers:
            self.runs[run_id] = "active"
            for gone in deleted:
                self.models[gone].deleted = True
            self.models[model_id] = Logged(model_id, run_id, uri, version, states.pop(0), checkpoint=True)

    # ------------------------------------------------------------------ the invariants
    def check_references(self) -> None:
        """Every logged model MLflow still lists and every model version loads its exact weights."""
        for m in self._live_models():  # a logged model MLflow still lists
            self._loads(m, f"logged model {m.model_id}")
        for (name, version), model_id in sorted(self.versions.items()):  # every model version
            self._loads(self.models[model_id], f"models:/{name}/{version}")

    def _loads(self, m: Logged, what: str) -> None:
        self.checked += 1
        try:
            assert_equal(model_part(store.read_state_dict(m.uri, m.version), m), m.weights, what)
        except (AssertionError, ml.WeightsError) as err:
            self.lost.append(f"{what}: {err}"[:300])

    def check(self) -> None:
        self.check_references()
        assert not self.lost, self.lost
        sample = [*self.rng.sample(sorted(self.versions), min(3, len(self.versions)))]
        for name, version in sample:  # and through MLflow, where MLflow still has the files
            m = self.models[self.versions[(name, version)]]
            if not m.purged:
                got = model_part(ml.load_state_dict(f"models:/{name}/{version}"), m)
                assert_equal(got, m.weights, f"models:/{name}/{version}")
        referenced: dict[str, set[int]] = {}
        for m in self._live_models():
            referenced.setdefault(m.uri, set()).add(m.version)
        for model_id in self.versions.values():
            m = self.models[model_id]
            referenced.setdefault(m.uri, set()).add(m.version)
        for uri in {m.uri for m in self.models.values()}:
            stored = [v.version for v in store.versions(uri)]
            expected = referenced.get(uri, set()) | {stored[-1]}
            assert set(stored) == expected, f"{uri}: stored {stored}, referenced {sorted(expected)}"
            # and the space came back: no data file is left that no surviving version uses
            ds = lance.dataset(uri)
            used = {
                f.path for v in stored for frag in ds.checkout_version(v).get_fragments() for f in frag.metadata.files
            }
            assert set(os.listdir(Path(uri) / "data")) == used, f"{uri}: data files no version uses"

    OPS = {
        "op_log": 24,
        "op_register_later": 8,
        "op_copy": 6,
        "op_rename": 4,
        "op_alias_or_stage": 4,
        "op_delete_run": 6,
        "op_restore_run": 3,
        "op_delete_model_version": 12,
        "op_delete_registered_model": 2,
        "op_delete_logged_model": 12,
        "op_mlflow_gc": 1,
        "op_sync": 6,
        "op_gc": 8,
        "op_log_while_gc": 2,
        "op_sync_while_gc": 3,
        "op_gc_with_registry_races": 6,
        "op_distributed_checkpoints": 6,
    }

    def run(self, steps: int) -> list[str]:
        done = []
        names, weights_ = zip(*self.OPS.items(), strict=True)
        for _ in range(steps):
            op = self.rng.choices(names, weights_)[0]
            getattr(self, op)()
            self.counts[op] = self.counts.get(op, 0) + 1
            done.append(op)
        self.op_mlflow_gc()
        self.op_gc()
        return done


def model_part(loaded: dict, m: Logged) -> dict:
    return dict(loaded["model"]) if m.checkpoint else loaded


def assert_equal(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), what
    assert all(torch.equal(got[k], want[k]) for k in want), what


class Ranks:
    """Two torch.distributed ranks (gloo, spawned once per test) that log checkpoints of an
    FSDP2 model on request (tests/dist_workers.py ``lifecycle_ranks``)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def __enter__(self) -> "Ranks":
        import torch.multiprocessing as mp

        from conftest import free_port

        ctx = mp.get_context("spawn")
        self.commands, self.results = [ctx.Queue() for _ in range(2)], ctx.Queue()
        args = (2, free_port(), str(self.tmp), self.commands, self.results)
        self.procs = mp.start_processes(W.lifecycle_ranks, args=args, nprocs=2, join=False, start_method="spawn")
        return self

    def ask(self, command: tuple) -> list:
        for q in self.commands:
            q.put(command)
        answers = dict(self.results.get(timeout=300) for _ in self.commands)
        assert not any(isinstance(a, str) for a in answers.values()), answers
        assert answers[0] == answers[1], answers  # every rank got the same checkpoints back
        return answers[0]

    def __exit__(self, *exc: object) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs.processes:
            p.join(60)
            if p.exitcode is None:
                p.kill()


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def own_server(request, tmp_path_factory):
    """A server of its own per backend, so that `mlflow gc` and `gc --all` see only this test."""
    root = tmp_path_factory.mktemp(f"lifecycle-{request.param}")
    args = ["--artifacts-destination", str(root / "artifacts")]
    if request.param == "sqlite":
        backend = f"sqlite:///{root}/mlflow.db"
        with running_mlflow_server(root, args, backend=backend) as url:
            yield {"url": url, "root": root, "backend": backend, "kind": "sqlite"}
    else:
        with running_postgres() as backend, running_mlflow_server(root, args, backend=backend) as url:
            yield {"url": url, "root": root, "backend": backend, "kind": "postgresql"}


@pytest.mark.slow
def test_random_mlflow_lifecycles_lose_nothing_and_reclaim_the_rest(own_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", own_server["url"])
    monkeypatch.setenv("MLFLOW_LANCE_ROOT", str(tmp_path / "lance"))
    mlflow.set_tracking_uri(own_server["url"])
    mlflow.set_experiment("lifecycle")
    seed = int(os.environ.get("MLFLOW_LANCE_MODEL_SEED", "20261130"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lifecycle")
    with Ranks(tmp_path) as ranks:
        world = World(random.Random(seed), own_server, ranks)
        try:
            world.run(STEPS)
        finally:
            mlflow.set_tracking_uri(None)
    report(
        "lifecycle.json",
        own_server["kind"],
        {
            "seed": seed,
            "operations": STEPS,
            "by_operation": world.counts,
            "references_checked": world.checked,
            "registry_operations_inside_gc": world.inside_gc,
            "logged_models": len(world.models),
            "distributed_checkpoints": sum(m.checkpoint for m in world.models.values()),
            "versions_reclaimed": world.versions_reclaimed,
            "bytes_reclaimed": world.bytes_reclaimed,
            "lost": len(world.lost),
        },
    )
    assert not world.lost, world.lost
    assert world.counts.get("op_gc", 0) + world.counts.get("op_log_while_gc", 0) >= STEPS // 40
    assert world.inside_gc >= STEPS // 50  # registry operations really ran inside gc's steps
    assert world.counts.get("op_distributed_checkpoints", 0) >= STEPS // 50
    assert world.versions_reclaimed > 0 and world.bytes_reclaimed > 0
