"""Flip bytes in copies of real datasets and run every read on each copy (the byte-flip fuzzer
of tests/test_byteflip.py, run as a child under a memory cap so that an abort is seen).

Usage: byteflip_worker.py SEED CASES WORKDIR. Seeded: case i of seed s flips the same bytes of
the same file every run (Lance writes a data file's schema metadata in hash order, so a few
bytes of its footer differ from run to run; the offsets flipped do not). Before each case it
prints ``case <i>`` to stderr, so that if the process dies the case that killed it is named.
At the end it prints one JSON line: the number of cases and reads run, how each read ended,
and every read that ended other than in the data or one of the package's errors ("bad"), or
returned other bytes than were saved from a verified read ("wrong").
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import torch

import mlflow_lance as ml
from mlflow_lance.cli import main as cli

TARGETS = {
    "manifest": "_versions/*.manifest",
    "data file": "data/*.lance",
    "index": "_mlflow_lance/index/*.json",
    "transaction": "_transactions/*.txn",
    "tag": "_refs/tags/*.json",
}


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(64, 32, generator=g)
    return {
        "emb": emb,
        "head": emb,
        "big": torch.randn(70_000, generator=g),
        "bias": torch.arange(8),
        "f16": torch.randn(3, 3, generator=g).half(),
        "scale": torch.tensor(2.5),
        "flag": torch.tensor([True, False]),
    }


def pristine(root: Path) -> dict[str, tuple[Path, list[dict[str, torch.Tensor]]]]:
    """Three datasets (raw, zstd and auto), each with two versions and a tag; their state dicts."""
    out = {}
    for kind, compression in (("raw", None), ("zstd", "zstd"), ("auto", "auto")):
        uri = root / f"{kind}.lance"
        sds = [state(1), {**state(1), "bias": torch.arange(8) * 3}]
        for sd in sds:
            ml.save_state_dict(sd, uri, compression=compression)
        ml.tag(uri, "first", 1)
        out[kind] = (uri, sds)
    return out


def stable_order(uri: Path, target: str) -> list[Path]:
    """The target's files in an order that does not depend on their random names: data files
    by their place in the versions' fragment lists, transaction files by read version."""
    files = list(uri.glob(TARGETS[target]))
    if target == "data file":
        import lance

        ds, order = lance.dataset(str(uri)), []
        for v in ds.versions():
            for f in ds.checkout_version(v["version"]).get_fragments():
                order += [p for p in (uri / "data" / f.metadata.files[0].path,) if p not in order]
        return [p for p in order if p in files]
    return sorted(files, key=lambda p: (int(p.name.split("-")[0]) if target == "transaction" else 0, p.name))


def flip(rng: random.Random, path: Path) -> None:
    data = bytearray(path.read_bytes())
    if not data:
        return
    tail = len(data) > 8192 and rng.random() < 0.7  # a data file's metadata and footer are at its end
    lo = len(data) - 4096 if tail else 0
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(lo, len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def same(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]) for k in want
    )


class Holder(torch.nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in sd.items():
            self.register_buffer(k, torch.zeros_like(v))


def reads(uri: Path, sds: list[dict]) -> dict:
    """Every read, as a callable returning what must equal the saved state (or None: no check)."""
    return {
        "load": lambda: (ml.load_state_dict(uri), None),
        "load verified": lambda: (ml.load_state_dict(uri, verify=True), sds[-1]),
        "load version 1 verified": lambda: (ml.load_state_dict(uri, 1, verify=True), sds[0]),
        "load tag": lambda: (ml.load_state_dict(uri, "first"), None),
        "load_into verified": lambda: (ml.load_into(Holder(sds[-1]), uri, verify=True), None),
        "verify": lambda: (ml.verify(uri), None),
        "versions": lambda: (ml.versions(uri), None),
        "diff": lambda: (ml.diff(uri, 1), None),
        "cli verify": lambda: (cli(["verify", str(uri)]), None),
    }


def main() -> None:
    seed, cases, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    base = pristine(work / "pristine")
    counts: dict[str, int] = {}
    bad, wrong, runs = [], [], 0
    for case in range(cases):
        rng = random.Random(seed * 1_000_003 + case)
        kind = rng.choice(sorted(base))
        target = rng.choice(sorted(TARGETS))
        uri, sds = base[kind]
        copy = work / f"case-{case}.lance"
        shutil.copytree(uri, copy)
        files = stable_order(copy, target)
        victim = rng.choice(files) if files else None
        if victim is not None:
            flip(rng, victim)
        if target != "index" and rng.random() < 0.5:  # without the index, the rows are decoded
            shutil.rmtree(copy / "_mlflow_lance", ignore_errors=True)
        where = f"case {case}: {kind}, {target} {victim.name if victim else '-'}"
        print(f"case {case} {where}", file=sys.stderr, flush=True)
        for name, read in reads(copy, sds).items():
            runs += 1
            try:
                got, want = read()
            except ml.WeightsError as err:
                outcome = "refused: the decoder died" if "crashed the decoder" in str(err) else "refused"
            except Exception as err:  # noqa: BLE001 (each counted, named and reported)
                outcome = "bad"
                bad.append(f"{where}: {name}: {type(err).__name__}: {str(err)[:200]}")
            else:
                outcome = "returned"
                if name == "cli verify" and got not in (0, 1, 2, 3):
                    bad.append(f"{where}: {name}: exit code {got}")
                if want is not None and not same(got, want):
                    wrong.append(f"{where}: {name}: returned other bytes than were saved")
            counts[outcome] = counts.get(outcome, 0) + 1
        shutil.rmtree(copy)
    print(json.dumps({"seed": seed, "cases": cases, "reads": runs, "outcomes": counts, "bad": bad, "wrong": wrong}))


if __name__ == "__main__":
    main()
