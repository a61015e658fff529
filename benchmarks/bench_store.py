"""Store speed, size and memory against torch.save, safetensors and the Lance docs example.

Run:  python benchmarks/bench_store.py [--repeat 5] [--models gpt2,resnet50,llama] [--skip-docs-example]

Three state dicts, random values, no download: GPT-2 small (124M parameters, 148 fp32
tensors, from a config), a ResNet-50-shaped one (320 tensors, 102 MB fp32 with BatchNorm
statistics; benchmarks/shapes.py) and a LLaMA-shaped bf16 one (146 tensors, 2.08 GB). For
each, the peers and ours run interleaved (one round = every contender once, ``--repeat``
rounds) with a warm page cache, and the script prints medians and ratios; on a shared
machine the figures are noisy, so compare ratios from one run. GPT-2 also gets the partial
load, peak-memory and docs-example figures, and on a machine with CUDA, GPU loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

import mlflow_lance as ml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from docs_example import docs_load_state_dict, docs_save_model  # noqa: E402
from shapes import llama_state_dict, module_for, resnet50_state_dict


def build_model() -> torch.nn.Module:
    """GPT-2 small (124M parameters, 148 tensors) with random weights."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config()).eval()


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def rchar() -> int:
    """Bytes this process has read through read syscalls (page cache included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def peak_rss_of_load_into(uri: str) -> dict:
    """Peak RSS above baseline while load_into fills a model, measured in a fresh process."""
    code = f"""
import gc, json, threading, time, psutil, torch, sys
sys.path.insert(0, {str(HERE)!r})
from bench_store import build_model
import mlflow_lance as ml
model = build_model(); gc.collect()
p = psutil.Process(); base = p.memory_info().rss; peak = [base]; stop = []
def sample():
    while not stop:
        peak[0] = max(peak[0], p.memory_info().rss); time.sleep(0.0005)
t = threading.Thread(target=sample); t.start()
ml.load_into(model, {uri!r})
stop.append(1); t.join(); peak[0] = max(peak[0], p.memory_info().rss)
largest = max(v.numel() * v.element_size() for v in model.state_dict().values())
print(json.dumps({{"peak_above_baseline": peak[0] - base, "largest_tensor": largest}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(contenders: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each contender, run in rounds (each contender once per round)."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeat):
        for name, (fn, setup) in contenders.items():
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def workload(sd: dict, module: torch.nn.Module, key: str, repeat: int, tmp: Path, versions: int = 10) -> dict:
    """Saves and loads of ``sd`` by every contender, then ``versions`` saves that change ``key``."""
    from safetensors.torch import load_file, save_file

    pt, st, uri = tmp / "model.pt", tmp / "model.safetensors", tmp / "w.lance"
    sd = OrderedDict(sd)
    r = interleaved({  # saves, then loads of what the last round saved (not of files written just before)
        "torch_save": (lambda: torch.save(sd, pt), None),
        "st_save": (lambda: save_file(sd, st), None),
        "ml_first_save": (lambda: ml.save_state_dict(sd, uri), lambda: shutil.rmtree(uri, ignore_errors=True)),
    }, repeat)  # fmt: skip
    r |= interleaved({
        "torch_load_into": (lambda: module.load_state_dict(torch.load(pt, weights_only=True, mmap=True)), None),
        "st_load": (lambda: load_file(st), None),
        "st_load_into": (lambda: module.load_state_dict(load_file(st)), None),
        "ml_load_state_dict": (lambda: ml.load_state_dict(uri), None),
        "ml_load_into": (lambda: ml.load_into(module, uri), None),
        "ml_load_into_verify": (lambda: ml.load_into(module, uri, verify=True), None),
    }, repeat)  # fmt: skip
    r["raw_bytes"] = sum(v.numel() * v.element_size() for v in sd.values())
    r["first_bytes"] = du(uri)
    r["files"] = len(list((uri / "data").iterdir()))
    times, growth = [], []
    for i in range(versions):
        sd[key] = sd[key] + 1
        before = du(uri)
        t0 = time.perf_counter()
        info = ml.save_state_dict(sd, uri, message=f"step {i}")
        times.append(time.perf_counter() - t0)
        growth.append(du(uri) - before)
        assert info.changed == (key,), info.changed
    r["ml_version_1_changed"] = statistics.median(times)
    r["growth"] = int(statistics.median(growth))
    r["changed_bytes"] = sd[key].numel() * sd[key].element_size()
    r["total_after"] = du(uri)
    r["ml_identical_save"] = interleaved({"s": (lambda: ml.save_state_dict(sd, uri), None)}, repeat)["s"]
    r["versions"] = versions
    r["tensors"] = len(sd)
    return r


def gpt2_extras(sd: dict, model: torch.nn.Module, tmp: Path, skip_docs: bool) -> dict:
    """GPT-2 only: a partial load's bytes read, load_into's peak RSS, the docs example."""
    uri = tmp / "w.lance"
    ml.save_state_dict(sd, uri)
    r = {}
    os.environ["MLFLOW_LANCE_MMAP"] = "0"  # read, not mapped, so that the reads are counted
    io0 = rchar()
    part = ml.load_state_dict(uri, names="h.3.*")
    r["partial_read"] = rchar() - io0
    del os.environ["MLFLOW_LANCE_MMAP"]
    r["partial_bytes"] = sum(v.numel() * v.element_size() for v in part.values())
    r["rss"] = peak_rss_of_load_into(str(uri))
    if not skip_docs:  # slow: run once
        docs = tmp / "docs.lance"
        t0 = time.perf_counter()
        docs_save_model(sd, str(docs))
        r["docs_save"] = time.perf_counter() - t0
        r["docs_bytes"] = du(docs)
        t0 = time.perf_counter()
        model.load_state_dict(docs_load_state_dict(str(docs)))
        r["docs_load_into"] = time.perf_counter() - t0
    return r


def cuda_loads(model: torch.nn.Module, repeat: int, tmp: Path) -> dict:
    """GPU loads against safetensors load_file(device=...), when CUDA is available."""
    from safetensors.torch import load_file

    st, uri, dev = tmp / "model.safetensors", tmp / "w.lance", "cuda"  # as workload() left them
    gpu_model = model.to(dev)

    def sync(x: object) -> None:
        torch.cuda.synchronize()

    return interleaved({
        "st_load_file_cuda": (lambda: sync(load_file(st, device=dev)), None),
        "ml_load_state_dict_cuda": (lambda: sync(ml.load_state_dict(uri, map_location=dev)), None),
        "st_load_into_cuda": (lambda: sync(gpu_model.load_state_dict(load_file(st, device=dev))), None),
        "ml_load_into_cuda": (lambda: sync(ml.load_into(gpu_model, uri)), None),
    }, repeat)  # fmt: skip


def print_workload(label: str, r: dict) -> None:
    def row(text: str, ours: float, peer: float, target: float | None = None) -> None:
        ratio = ours / peer
        mark = "" if target is None else ("  OK" if ratio <= target else f"  MISSES target {target}")
        print(f"  {text:<58} {ours:8.4f} {peer:8.4f} {ratio:7.3f}x{mark}")

    print(f"\n{label}: {r['tensors']} tensors, {r['raw_bytes']:,} bytes, {r['files']} data files")
    print(f"  {'ours vs peer (median seconds)':<58} {'ours':>8} {'peer':>8} {'ratio':>8}")
    row("first save vs safetensors save_file", r["ml_first_save"], r["st_save"], 1.2)
    row("first save vs torch.save", r["ml_first_save"], r["torch_save"])
    row("load_into vs safetensors load_file + load_state_dict", r["ml_load_into"], r["st_load_into"], 1.1)
    row("load_into vs torch.load(mmap) + load_state_dict", r["ml_load_into"], r["torch_load_into"])
    row("load_state_dict (maps) vs safetensors load_file", r["ml_load_state_dict"], r["st_load"])
    row("load_into(verify=True) vs load_into", r["ml_load_into_verify"], r["ml_load_into"])
    row("a version with 1 tensor changed vs first save", r["ml_version_1_changed"], r["ml_first_save"], 0.25)
    row("identical re-save vs first save", r["ml_identical_save"], r["ml_first_save"])
    raw, first = r["raw_bytes"], r["first_bytes"]
    print(f"  first version on disk {first:,} ({first / raw - 1:+.3%} vs raw; target <= +1%)")
    print(f"  growth per 1-tensor version (median) {r['growth']:,} = changed tensor {r['changed_bytes']:,} + "
          f"{r['growth'] - r['changed_bytes']:,} (target <= +1 MiB)")
    print(f"  {r['versions'] + 1} versions on disk {r['total_after']:,} ({r['total_after'] / raw:.3f}x raw)")


def print_gpt2_extras(x: dict, raw: int) -> None:
    if "docs_save" in x:
        print(f"  docs example: save {x['docs_save']:.2f} s, load into the model {x['docs_load_into']:.2f} s, "
              f"{x['docs_bytes']:,} bytes ({x['docs_bytes'] / raw:.2f}x raw)")
    print(f"  partial load of 12 tensors (h.3.*): {x['partial_read']:,} bytes read for {x['partial_bytes']:,} "
          f"tensor bytes ({x['partial_read'] / x['partial_bytes']:.3f}x; the model is {raw:,})")
    rss = x["rss"]
    print(f"  load_into peak RSS above baseline {rss['peak_above_baseline']:,} "
          f"({rss['peak_above_baseline'] / rss['largest_tensor']:.2f}x the largest tensor, "
          f"{rss['largest_tensor']:,}; target <= 2x)")


def _gpt2() -> tuple[dict, torch.nn.Module]:
    model = build_model()
    return model.state_dict(), model


def _shaped(build) -> Callable[[], tuple[dict, torch.nn.Module]]:
    def make() -> tuple[dict, torch.nn.Module]:
        sd = build()
        return sd, module_for(sd)

    return make


WORKLOADS = {  # name -> (label, state dict and module builder, the tensor a new version changes)
    "gpt2": ("GPT-2 small, fp32", _gpt2, "h.11.mlp.c_proj.weight"),
    "resnet50": ("ResNet-50-shaped, fp32", _shaped(resnet50_state_dict), "fc.weight"),
    "llama": ("LLaMA-shaped, bf16", _shaped(llama_state_dict), "model.layers.15.mlp.down_proj.weight"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--models", default="gpt2,resnet50,llama", help="comma-separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--skip-docs-example", action="store_true", help="skip the slow docs-example baseline")
    args = ap.parse_args()
    print(f"repeat={args.repeat}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; "
          f"rounds interleave every contender, figures are medians")
    for name in args.models.split(","):
        label, build, key = WORKLOADS[name]
        sd, module = build()
        sd = OrderedDict((k, v.detach().clone()) for k, v in sd.items())
        tmp = Path(tempfile.mkdtemp(prefix=f"bench_store_{name}_"))
        try:
            r = workload(sd, module, key, args.repeat, tmp)
            print_workload(label, r)
            if name == "gpt2":
                shutil.rmtree(tmp / "w.lance")
                print_gpt2_extras(gpt2_extras(sd, module, tmp, args.skip_docs_example), r["raw_bytes"])
            if torch.cuda.is_available():
                for k, v in cuda_loads(module, args.repeat, tmp).items():
                    print(f"  {k:<30} {v:9.4f}")
            else:
                print("  CUDA: not available here, skipped")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del sd, module


if __name__ == "__main__":
    main()
