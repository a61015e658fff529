"""The `mlflow-lance` command on real datasets (and a real registry for model names)."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import lance
import mlflow
import pytest
import torch
from model_zoo import SmallCNN, trained
from safetensors.torch import load_file, save_file

import mlflow_lance as ml
from conftest import BIN
from mlflow_lance.cli import EXAMPLES, main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier steps printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dataset(tmp_path) -> Path:
    uri = tmp_path / "w.lance"
    sd = {"a": torch.ones(100), "b": torch.zeros(50), "c": torch.arange(10)}
    ml.save_state_dict(sd, uri, message="first")
    sd["b"] = sd["b"] + 1
    ml.save_state_dict(sd, uri, message="second")
    return uri


def test_help_shows_an_example_for_every_command():
    out = subprocess.run([str(BIN / "mlflow-lance"), "--help"], capture_output=True, text=True, check=True).stdout
    for command in EXAMPLES:
        assert command in out
        sub = subprocess.run(
            [str(BIN / "mlflow-lance"), command, "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert "example:" in sub and f"mlflow-lance {command}" in sub


def test_versions_table_and_json(capsys, dataset):
    code, out, _ = run(capsys, "versions", str(dataset))
    assert code == 0 and "version" in out.splitlines()[1] and "second" in out
    code, out, _ = run(capsys, "versions", str(dataset), "--json")
    doc = json.loads(out)
    assert [v["version"] for v in doc] == [1, 2] and doc[1]["changed"] == ["b"]


def test_diff_tag_and_gc(capsys, dataset):
    code, out, _ = run(capsys, "diff", str(dataset), "1", "2")
    assert code == 0 and "M b" in out and "1 changed" in out
    assert json.loads(run(capsys, "diff", str(dataset), "1", "--json")[1])["changed"] == ["b"]
    assert run(capsys, "tag", str(dataset), "keep", "1")[0] == 0
    assert ml.tags(dataset) == {"keep": 1}
    code, out, _ = run(capsys, "gc", str(dataset), "--keep-last", "1", "--grace-minutes", "0", "--dry-run", "--json")
    assert json.loads(out)[0]["removed_versions"] == []  # the only old version is tagged
    assert json.loads(out)[0]["kept"] == {"1": ["tag:keep"], "2": ["latest"]}
    assert json.loads(out)[0]["kept_referenced"] == []  # MLflow never saw this dataset
    code, out, _ = run(capsys, "gc", str(dataset), "--keep-last", "1", "--dry-run")  # 30 min grace
    assert code == 0 and "kept 2 versions: 1 tagged, 1 latest, 1 within the grace period;" in out
    assert "MLflow" not in out
    assert run(capsys, "tag", str(dataset), "keep", "--delete")[0] == 0
    code, out, _ = run(capsys, "gc", str(dataset), "--keep-last", "1", "--grace-minutes", "0", "--json")
    assert code == 0 and json.loads(out)[0]["removed_versions"] == [1]
    assert run(capsys, "gc", "--grace-minutes", "0")[0] == 2  # neither a target nor --all
    assert [v.version for v in ml.versions(dataset)] == [2]


def test_verify_exit_codes(capsys, dataset):
    code, out, _ = run(capsys, "verify", str(dataset))
    assert code == 0 and out.strip().endswith("OK")
    frag = lance.dataset(str(dataset)).get_fragments()[0].metadata.files[0].path
    path = dataset / "data" / frag
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    code, out, _ = run(capsys, "verify", str(dataset), "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["ok"] and doc["problems"][0]["name"] == "a"


def test_export_and_import_round_trip(capsys, dataset, tmp_path):
    out_file = tmp_path / "w.safetensors"
    assert run(capsys, "export", str(dataset), str(out_file), "--version", "1")[0] == 0
    exported = load_file(out_file)
    assert torch.equal(exported["b"], torch.zeros(50)) and sorted(exported) == ["a", "b", "c"]
    target = tmp_path / "imported.lance"
    assert run(capsys, "import", str(target), str(out_file))[0] == 0
    pt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"a": torch.ones(100), "b": torch.full((50,), 2.0), "c": torch.arange(10)}}, pt)
    code, out, _ = run(capsys, "import", str(target), str(pt), "-m", "from a torch checkpoint", "--json")
    info = json.loads(out)
    assert code == 0 and info["changed"] == ["b"] and info["message"] == "from a torch checkpoint"
    assert torch.equal(ml.load_state_dict(target)["b"], torch.full((50,), 2.0))
    save_file({"w": torch.ones(2)}, tmp_path / "x.safetensors")
    not_sd = tmp_path / "list.pt"
    torch.save([torch.ones(1)], not_sd)
    code, _, err = run(capsys, "import", str(target), str(not_sd))
    assert code == 2 and "not a state dict" in err
    odd = tmp_path / "odd.pt"  # a tensor save refuses with a TypeError: still bad input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"w": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint4x2)}, odd)
    code, _, err = run(capsys, "import", str(target), str(odd))
    assert code == 2 and "quint4x2" in err and str(odd) in err and "Traceback" not in err
    assert [v.version for v in ml.versions(target)] == [1, 2]


def test_a_type_error_from_a_bug_exits_4_with_its_traceback(capsys, dataset, monkeypatch):
    from mlflow_lance import store

    def broken(*args, **kwargs):
        return len(None)  # a TypeError bug: not bad input

    monkeypatch.setattr(store, "versions", broken)
    code, _, err = run(capsys, "versions", str(dataset))
    assert code == 4 and "Traceback" in err and "TypeError" in err and "internal error" in err


def test_not_found_exit_code(capsys, tmp_path):
    code, _, err = run(capsys, "versions", str(tmp_path / "missing.lance"))
    assert code == 3 and "no weights dataset" in err
    code, _, err = run(capsys, "diff", str(tmp_path / "missing.lance"), "1")
    assert code == 3


def test_registered_model_names_and_sync(capsys, tracking):
    with mlflow.start_run():
        info = ml.log_model(trained(SmallCNN(), 1), name="model", registered_model_name="cli-model")
    with mlflow.start_run():
        ml.log_model(trained(SmallCNN(), 2), name="model", registered_model_name="cli-model")
    code, out, err = run(capsys, "versions", "cli-model", "--json")
    assert code == 0, err
    assert [v["version"] for v in json.loads(out)] == [1, 2]
    assert info.flavors["mlflow_lance"]["lance_uri"] in run(capsys, "versions", "cli-model")[1]
    code, out, _ = run(capsys, "sync", "cli-model", "--json")
    assert code == 0 and json.loads(out)[0]["model_versions"] == {"1": 1, "2": 2}
    code, _, err = run(capsys, "versions", "no-such-model")
    assert code == 3 and "no-such-model" in err
