"""Bytes per version and decode speed of mlflow_lance.encodings, against zstd of the raw
bytes (what ``compression="zstd"`` stores) and ZipNN.

Run:  python benchmarks/bench_encodings.py [--versions 6] [--steps 3] [--rounds 3]
                                           [--json benchmarks/results/encodings.json]

- **One version**: a GPT-2-shaped model (``GPT2Config(n_layer=4)``, random init, the tied
  ``lm_head`` counted once) in bfloat16 and float32; every tensor encoded with the encoding
  ``encodings.choose`` picks (from sampled blocks), stored / raw bytes over the whole state dict.
- **An AdamW series**: the same model in float32 trained ``--steps`` AdamW steps (lr 1e-3,
  weight decay 0.01, batches of random tokens) between ``--versions`` versions; each later
  version's tensors encoded against the previous version's (a tensor whose bytes did not
  change costs nothing: the store writes changed tensors only), with a delta chain of at most
  ``encodings.MAX_CHAIN`` deltas (the next one is a full encoding). bfloat16: the float32
  weights cast at each version.
- **An embedding with 1% of its rows changed**: GPT-2's float32 ``wte`` (50257 x 768) with
  1% of its rows redrawn, encoded against the original.
- **Through the store**: the bf16 and fp32 models saved with ``compression=`` "none", "zstd"
  and "auto" (data bytes on disk), and ``load_into`` a fresh model from each (local disk, page
  cache warm, median of ``--rounds`` interleaved rounds).
- **Decode speed**: one core (numpy and zstd single-threaded), each encoding's blobs of the
  first series decoded into a preallocated destination, median of ``--rounds`` interleaved
  rounds; peak Python-heap memory (tracemalloc) of decoding ``wte``.

ZipNN (``pip install zipnn``; skipped when it is not installed) compresses each tensor's
bytes with its defaults for the dtype, single-threaded, and each delta as ZipNN's own docs
do: the XOR of the two versions' bytes compressed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import torch
import zstandard

from mlflow_lance import encodings as E
from mlflow_lance.tensors import dtype_name, hash_bytes

GOALS = {  # (goal text, target, unit): stored / raw bytes unless seconds
    "bf16_first": ("one bf16 version of GPT-2 (4 layers), random init <= 0.70x raw", 0.70),
    "fp32_first": ("one fp32 version of GPT-2 (4 layers), random init <= 0.86x raw", 0.86),
    "bf16_later": ("AdamW series, bf16: each later version <= 0.55x raw (mean)", 0.55),
    "fp32_later": ("AdamW series, fp32: each later version <= 0.78x raw (mean)", 0.78),
    "embedding": ("fp32 embedding, 1% of rows changed: <= 3% of the tensor's bytes", 0.03),
}


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=4)).eval()


def tensors(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Name -> uint8 bytes of each distinct tensor (a tied weight once), cast to ``dtype``."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen or not t.is_floating_point():
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().copy()
    return out


def esize(dtype: torch.dtype) -> int:
    return E.element_size_of(torch.empty(0, dtype=dtype).element_size())


class Zipnn:
    """ZipNN with its per-dtype defaults, single-threaded (None when not installed)."""

    def __init__(self) -> None:
        from zipnn import ZipNN

        self.by_dtype = {
            d: ZipNN(input_format="byte", bytearray_dtype=n, threads=1)
            for d, n in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32"))
        }

    def size(self, data: np.ndarray, dtype: torch.dtype) -> int:
        z = self.by_dtype[dtype]
        blob = z.compress(data.tobytes())
        assert z.decompress(blob) == data.tobytes()
        return len(blob)


def zipnn_or_none() -> Zipnn | None:
    try:
        return Zipnn()
    except ImportError:
        return None


def encode(data: np.ndarray, dtype: torch.dtype, parent: np.ndarray | None) -> tuple[bytes | None, E.Choice]:
    """The blob ``choose`` + ``encode`` give one tensor (None: raw, stored as it is)."""
    name = dtype_name(dtype)
    choice = E.choose(data, name, esize(dtype), parent=parent)
    if choice.encoding == E.RAW:
        return None, choice
    kw = {"parent": parent, "parent_hash": bytes.fromhex(hash_bytes(parent))} if choice.encoding == E.XOR else {}
    blob = E.encode(data, 1 if choice.encoding == E.RAW else esize(dtype), encoding=choice.encoding,
                    flags=choice.flags, **kw)  # fmt: skip
    return blob, choice


def one_version(model: torch.nn.Module, dtype: torch.dtype, zipnn: Zipnn | None) -> dict:
    sd = tensors(model, dtype)
    raw = sum(a.nbytes for a in sd.values())
    zstd = zstandard.ZstdCompressor(level=3)
    stored, choices, z, zn = 0, {}, 0, 0
    for a in sd.values():
        blob, c = encode(a, dtype, None)
        stored += a.nbytes if blob is None else len(blob)
        label = E.NAMES[c.encoding] + ("+aligned" if c.flags else "")
        choices[label] = choices.get(label, 0) + 1
        z += len(zstd.compress(a))
        zn += zipnn.size(a, dtype) if zipnn else 0
    return {"raw": raw, "auto": stored / raw, "zstd": z / raw, "zipnn": zn / raw if zipnn else None,
            "choices": choices, "tensors": len(sd)}  # fmt: skip


def series(versions: int, steps: int) -> list[dict[str, np.ndarray]]:
    """float32 state dicts of GPT-2 trained ``steps`` AdamW steps between versions."""
    model = gpt2().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    out = [tensors(model, torch.float32)]
    for _ in range(versions - 1):
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        out.append(tensors(model, torch.float32))
    return out


def cast(sd: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, np.ndarray]:
    if dtype == torch.float32:
        return sd
    return {k: torch.from_numpy(a.view(np.float32)).to(dtype).view(torch.uint8).numpy() for k, a in sd.items()}


def series_sizes(sds: list[dict[str, np.ndarray]], dtype: torch.dtype, zipnn: Zipnn | None) -> tuple[dict, list]:
    """Stored / raw bytes of each later version (changed tensors only; bounded chains), and
    the blobs of every version (for the decode timing)."""
    depth: dict[str, int] = {}
    per_version, blobs, zn_ratios, changed = [], [], [], []
    zstd = zstandard.ZstdCompressor(level=3)
    for v, sd in enumerate(sds):
        raw = sum(a.nbytes for a in sd.values())
        stored = zn = n_changed = 0
        for name, a in sd.items():
            prev = sds[v - 1][name] if v else None
            if prev is not None and np.array_equal(prev, a):
                continue  # unchanged: the store writes nothing for it
            n_changed += 1
            parent = prev if prev is not None and depth.get(name, 0) < E.MAX_CHAIN else None
            blob, c = encode(a, dtype, parent)
            depth[name] = depth.get(name, 0) + 1 if c.encoding == E.XOR else 0
            stored += a.nbytes if blob is None else len(blob)
            if blob is not None:
                blobs.append((blob, a, parent if c.encoding == E.XOR else None))
            if zipnn and v:
                delta = np.bitwise_xor(a, prev)
                zn += min(zipnn.size(delta, dtype), len(zstd.compress(delta)))
        if v:
            per_version.append(stored / raw)
            zn_ratios.append(zn / raw)
            changed.append(n_changed)
    return {
        "later_mean": statistics.mean(per_version),
        "later": per_version,
        "zipnn_later_mean": statistics.mean(zn_ratios) if zipnn else None,
        "changed_tensors": changed,
        "tensors": len(sds[0]),
    }, blobs


def embedding(model: torch.nn.Module) -> dict:
    wte = model.transformer.wte.weight.detach().float().numpy()
    changed = wte.copy()
    rows = np.random.default_rng(0).choice(len(wte), len(wte) // 100, replace=False)
    changed[rows] = np.random.default_rng(1).standard_normal((len(rows), wte.shape[1])).astype(np.float32) * 0.02
    blob, c = encode(changed.view(np.uint8).ravel(), torch.float32, wte.view(np.uint8).ravel())
    dest = wte.copy().view(np.uint8).ravel()
    tracemalloc.start()
    E.decode(blob, dest)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert dest.tobytes() == changed.tobytes()
    return {"ratio": len(blob) / changed.nbytes, "encoding": E.NAMES[c.encoding], "bytes": changed.nbytes,
            "decode_peak_extra": peak / changed.nbytes}  # fmt: skip


def decode_speed(blobs: list, rounds: int) -> dict[str, float]:
    """GB/s of decoded bytes per encoding per CPU-second of the decoding thread (this machine
    is shared: wall time counts the waits for a core, thread time does not), median of
    interleaved rounds; raw tensors are stored as they are, with nothing to decode."""
    by: dict[str, list] = {}
    for blob, data, parent in blobs:
        h = E.read_header(blob, data.nbytes)
        by.setdefault(h.name + ("+aligned" if h.flags else ""), []).append((blob, data, parent))
    times: dict[str, list[float]] = {k: [] for k in by}
    for _ in range(rounds):
        for label, group in by.items():
            dests = [np.empty(d.nbytes, np.uint8) for _, d, _ in group]
            start = time.thread_time()
            for (blob, _, parent), dest in zip(group, dests, strict=True):
                E.decode(blob, dest, parent=parent)
            times[label].append(time.thread_time() - start)
            assert all(dest.tobytes() == d.tobytes() for (_, d, _), dest in zip(group, dests, strict=True))
    return {k: sum(d.nbytes for _, d, _ in by[k]) / statistics.median(v) / 1e9 for k, v in times.items()}


def changed(sizes: dict) -> str:
    """How many tensors the later versions changed, as "least..most of all"."""
    return f"{min(sizes['changed_tensors'])}..{max(sizes['changed_tensors'])} of {sizes['tensors']}"


def store_loads(model: torch.nn.Module, rounds: int, root: Path) -> dict:
    """Data bytes and ``load_into`` seconds of the model saved with each compression."""
    import mlflow_lance as ml

    out: dict = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        m = gpt2().to(dtype)
        m.load_state_dict(model.state_dict())
        uris = {c: root / f"{label}-{c}.lance" for c in ("none", "zstd", "auto")}
        for c, uri in uris.items():
            ml.save_state_dict(m.state_dict(), uri, compression=None if c == "none" else c)
        sizes = {c: sum(f.stat().st_size for f in (uri / "data").iterdir()) for c, uri in uris.items()}
        target = gpt2().to(dtype)
        times: dict[str, list[float]] = {c: [] for c in uris}
        for r in range(rounds):
            for c in list(uris)[:: 1 if r % 2 == 0 else -1]:
                start = time.perf_counter()
                ml.load_into(target, uris[c])
                times[c].append(time.perf_counter() - start)
        med = {c: statistics.median(v) for c, v in times.items()}
        out[label] = {"bytes": sizes, "seconds": med, "raw": sizes["none"]}
    return out


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg": os.getloadavg()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    zipnn = zipnn_or_none()
    model = gpt2()
    first = {n: one_version(model, d, zipnn) for n, d in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    emb = embedding(model)
    with tempfile.TemporaryDirectory() as tmp:
        loads = store_loads(model, args.rounds, Path(tmp))
    sds = series(args.versions, args.steps)
    later, speed = {}, {}
    for n, d in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        later[n], blobs = series_sizes([cast(sd, d) for sd in sds], d, zipnn)
        speed[n] = decode_speed(blobs, args.rounds)
    values = {"bf16_first": first["bf16"]["auto"], "fp32_first": first["fp32"]["auto"],
              "bf16_later": later["bf16"]["later_mean"], "fp32_later": later["fp32"]["later_mean"],
              "embedding": emb["ratio"]}  # fmt: skip
    goals = [{"goal": text, "value": values[k] * (100 if k == "embedding" else 1), "unit": "%" if k == "embedding"
              else "x", "target": target * (100 if k == "embedding" else 1), "met": values[k] <= target}
             for k, (text, target) in GOALS.items()]  # fmt: skip
    lowest = min(s for sp in speed.values() for s in sp.values())
    goals.append({"goal": "decode >= 1 GB/s on one core (slowest encoding)", "value": lowest, "unit": "",
                  "target": 1.0, "met": lowest >= 1.0})  # fmt: skip
    worst = max(loads[n]["seconds"]["auto"] / loads[n]["seconds"]["none"] for n in loads)
    goals.append({"goal": 'load_into from compression="auto" <= 1.3x from compression="none" (local, worse dtype)',
                  "value": worst, "unit": "x", "target": 1.3, "met": worst <= 1.3})  # fmt: skip
    goals.append({"goal": "decode peak memory <= 1.1x the tensor (wte, extra heap while decoding)",
                  "value": 1 + emb["decode_peak_extra"], "unit": "x", "target": 1.1,
                  "met": emb["decode_peak_extra"] <= 0.1})  # fmt: skip
    size_rows = [
        [f"one version, {n}", first[n]["auto"], first[n]["zstd"], first[n]["zipnn"]] for n in ("bf16", "fp32")
    ] + [
        [f"AdamW series, {n}: later versions (mean)", later[n]["later_mean"], None, later[n]["zipnn_later_mean"]]
        for n in ("bf16", "fp32")
    ]
    doc = {
        "benchmark": "bench_encodings",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds_total": time.time() - started,
        "parameters": vars(args) | {"json": str(args.json), "zipnn": zipnn is not None},
        "machine": machine(),
        "tables": [
            {
                "title": f"Stored / raw bytes, GPT-2 (n_layer=4, {first['fp32']['tensors']} tensors, tied lm_head "
                "once): mlflow_lance's per-tensor choice against zstd -3 of the raw bytes (today's "
                '`compression="zstd"`) and ZipNN',
                "columns": ["", "encodings (choose)", "zstd raw", "ZipNN"],
                "units": ["", "x", "x", "x"],
                "rows": size_rows,
            },
            {
                "title": "Through the store: data bytes / raw and `load_into` a fresh model (local disk, median "
                f"of {args.rounds} interleaved rounds)",
                "columns": [
                    "",
                    "none: bytes",
                    "zstd: bytes",
                    "auto: bytes",
                    "none: load",
                    "zstd: load",
                    "auto: load",
                    "auto load / none load",
                ],
                "units": ["", "x", "x", "x", "s", "s", "s", "x"],
                "rows": [
                    [
                        n,
                        *[loads[n]["bytes"][c] / loads[n]["raw"] for c in ("none", "zstd", "auto")],
                        *[loads[n]["seconds"][c] for c in ("none", "zstd", "auto")],
                        loads[n]["seconds"]["auto"] / loads[n]["seconds"]["none"],
                    ]
                    for n in ("bf16", "fp32")
                ],
            },  # fmt: skip
            {
                "title": f"AdamW series ({args.versions} versions, {args.steps} steps apart, max "
                f"{E.MAX_CHAIN} deltas per chain): stored / raw bytes of each later version",
                "columns": ["dtype", *[f"v{i + 2}" for i in range(args.versions - 1)], "tensors changed"],
                "units": ["", *["x"] * (args.versions - 1), ""],
                "rows": [[n, *later[n]["later"], changed(later[n])] for n in ("bf16", "fp32")],
            },
            {
                "title": "Decode, GB/s of tensor bytes per CPU-second of one thread (into a preallocated "
                f"destination; median of {args.rounds} interleaved rounds over the series' encoded blobs)",
                "columns": ["dtype", *sorted({k for sp in speed.values() for k in sp})],
                "units": ["", *[""] * len({k for sp in speed.values() for k in sp})],
                "rows": [
                    [n, *[speed[n].get(k) for k in sorted({k for sp in speed.values() for k in sp})]]
                    for n in ("bf16", "fp32")
                ],  # fmt: skip
            },
        ],
        "goals": goals,
        "samples": {"loads": loads, "first": first, "later": later, "embedding": emb, "decode_gbps": speed},
    }
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
