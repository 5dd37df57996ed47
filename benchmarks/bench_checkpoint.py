"""``lipnorm sigma`` on generated checkpoints: time against a full SVD per matrix, and peak memory.

Two checkpoints are written under ``build/checkpoints/`` (not committed; deleted at the end
unless ``--keep``), each as shards with a ``model.safetensors.index.json``:

``llama-bf16``
    Llama-shaped, bfloat16, ≥ 1 GB: hidden size 2048, MLP 5632, 32 query heads and 4
    key/value heads of 64 (grouped-query attention), vocabulary 32000, 9 layers (q, k, v, o,
    gate, up, down), embeddings and the output head; entries N(0, 0.02²), whose Gaussian
    spectra are the slow case for Lanczos (trained weights' decaying spectra converge sooner).
``float32-sharded``
    2.5 GB of 4096×8192 float32 matrices in four shards, for peak memory: tensors are read
    one at a time, so ``lipnorm sigma`` should stay under 0.6× the checkpoint's size.

On ``llama-bf16``, every repeat runs one after the other, each in a child process:

- ``lipnorm sigma DIR --no-bounds --json`` (the console command: estimates only);
- the WeightWatcher-style baseline: each matrix read with ``safe_open``, widened to float32
  and given to ``torch.linalg.svdvals`` (the full spectrum). A full run takes about half an
  hour on a 2-core machine, so by default it times one matrix of each distinct shape (the
  first in the checkpoint) and sums count × time over the checkpoint's matrices;
  ``--full-baseline`` runs every matrix.

Once, ``lipnorm sigma DIR --json`` (estimates and certified intervals). Times are the
children's wall times, medians over repeats; peak memory is each child's maximum resident
set size as GNU time reports it (``/usr/bin/time -f %M``), which counts file pages mapped
into it too. σ of the matrices the baseline
ran is compared with lipnorm's. Both sides use the libraries' default threads, or with
``--threads N`` N threads each (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
``MKL_NUM_THREADS``): on a machine shared with other jobs torch's two OpenMP threads can
make its SVD many times slower than one thread does, which would flatter lipnorm.

Run ``PYTHONPATH=. python benchmarks/bench_checkpoint.py`` (about an hour on a busy 2-core
machine); it writes ``benchmarks/results/bench_checkpoint_speed.md`` and
``bench_checkpoint_memory.md`` (``..._threads1.md`` with ``--threads 1``). ``--only speed``
or ``--only memory`` runs one part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "checkpoints"
RESULTS = Path(__file__).parent / "results"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

HIDDEN, MLP, HEAD, KV_HEADS, VOCAB, LAYERS = 2048, 5632, 64, 4, 32000, 9
LLAMA_MATRICES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN), "mlp.down_proj": (HIDDEN, MLP),
}
FLOAT32_SHAPE, FLOAT32_MATRICES, FLOAT32_SHARDS = (4096, 8192), 19, 4


def write_sharded(directory: Path, shards: list[dict[str, tuple[tuple[int, ...], str]]],
                  seed: int = 0) -> int:
    """Write shards of random matrices (name → (shape, dtype)) and their index; return bytes."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for number, specs in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, (shape, dtype) in specs.items():
            tensors[name] = (torch.randn(*shape, generator=generator) * 0.02).to(getattr(torch, dtype))
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(directory / file))
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def llama_shards() -> list[dict[str, tuple[tuple[int, ...], str]]]:
    """The Llama-shaped checkpoint's tensors in three shards (about equal sizes)."""
    tensors = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), "bfloat16")}
    for layer in range(LAYERS):
        for name, shape in LLAMA_MATRICES.items():
            tensors[f"model.layers.{layer}.{name}.weight"] = (shape, "bfloat16")
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = ((HIDDEN,), "bfloat16")
    tensors["lm_head.weight"] = ((VOCAB, HIDDEN), "bfloat16")
    names, shards = list(tensors), []
    for part in range(3):
        shards.append({name: tensors[name] for name in names[part * len(names) // 3:(part + 1) * len(names) // 3]})
    return shards


def float32_shards() -> list[dict[str, tuple[tuple[int, ...], str]]]:
    names = [f"blocks.{index}.weight" for index in range(FLOAT32_MATRICES)]
    per_shard = math.ceil(FLOAT32_MATRICES / FLOAT32_SHARDS)
    return [{name: (FLOAT32_SHAPE, "float32") for name in names[start:start + per_shard]}
            for start in range(0, FLOAT32_MATRICES, per_shard)]


def run_child(arguments: list[str], threads: int | None) -> tuple[float, float, str]:
    """Run Python in a child process; return its wall seconds, peak RSS in bytes and stdout.

    The peak is what GNU time reports for it (``/usr/bin/time -f %M``): measured on a child of
    that small program, it does not inherit this process's own peak, as ``os.wait4`` would.
    """
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        environment.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    peak = BUILD / "peak-rss-kib"
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(peak), sys.executable, *arguments],
                            stdout=subprocess.PIPE, env=environment, check=True)
    seconds = time.perf_counter() - start
    return seconds, int(peak.read_text().split()[-1]) * 1024, result.stdout.decode()


def lipnorm_sigma(directory: Path, *options: str, threads: int | None) -> tuple[float, float, list[dict]]:
    seconds, rss, output = run_child(["-m", "lipnorm.cli", "sigma", str(directory), "--json", *options],
                                     threads)
    return seconds, rss, json.loads(output)


def svd_baseline(index: Path, names: list[str]) -> None:
    """Child: read each named matrix, widen to float32, torch.linalg.svdvals; print JSON."""
    import torch
    from safetensors import safe_open

    weight_map = json.loads(index.read_text())["weight_map"]
    results = {}
    for name in names:
        start = time.perf_counter()
        with safe_open(str(index.parent / weight_map[name]), framework="pt") as file:
            matrix = file.get_tensor(name).float()
        top = float(torch.linalg.svdvals(matrix)[0])
        results[name] = {"seconds": time.perf_counter() - start, "sigma": top}
        del matrix
    print(json.dumps(results))


def checkpoint_matrices(index: Path) -> dict[str, tuple[int, ...]]:
    """The 2-D tensors of a checkpoint by name, from the headers."""
    from lipnorm.weights_io import open_weights

    return {name: t.shape for name, t in open_weights(index).items() if len(t.shape) == 2}


def measure_speed(repeats: int, full_baseline: bool, threads: int | None) -> dict:
    directory = BUILD / "llama-bf16"
    size = write_sharded(directory, llama_shards())
    index = directory / "model.safetensors.index.json"
    matrices = checkpoint_matrices(index)
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, shape in matrices.items():
        by_shape.setdefault(shape, []).append(name)
    sampled = list(matrices) if full_baseline else [names[0] for names in by_shape.values()]
    estimates, baselines, baseline_rss, estimate_rss = [], [], [], []
    for repeat in range(repeats):
        seconds, rss, rows = lipnorm_sigma(directory, "--no-bounds", threads=threads)
        estimates.append((seconds, rows))
        estimate_rss.append(rss)
        _, rss, output = run_child([__file__, "--svd-baseline", str(index), "--names", ",".join(sampled)],
                                   threads)
        baselines.append(json.loads(output))
        baseline_rss.append(rss)
        print(f"repeat {repeat + 1}: lipnorm --no-bounds {seconds:.1f} s", flush=True)
    certified_seconds, certified_rss, certified_rows = lipnorm_sigma(directory, threads=threads)
    shutil.rmtree(directory)
    return {
        "size": size, "matrices": matrices, "by_shape": by_shape, "sampled": sampled,
        "estimates": estimates, "estimate_rss": max(estimate_rss), "baselines": baselines,
        "baseline_rss": max(baseline_rss), "certified": (certified_seconds, certified_rows),
        "certified_rss": certified_rss,
    }


def measure_memory(threads: int | None) -> dict:
    directory = BUILD / "float32-sharded"
    size = write_sharded(directory, float32_shards())
    runs = {}
    for options in (("--no-bounds",), ()):
        seconds, rss, rows = lipnorm_sigma(directory, *options, threads=threads)
        runs[" ".join(options)] = (seconds, rss, len(rows))
        print(f"lipnorm sigma {' '.join(options)}: {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MiB",
              flush=True)
    shutil.rmtree(directory)
    return {"size": size, "largest": 4 * math.prod(FLOAT32_SHAPE), "runs": runs}


def versions() -> str:
    names = ("numpy", "scipy", "torch", "safetensors", "ml_dtypes")
    return ", ".join(f"{name} {metadata.version(name)}" for name in names)


def speed_table(result: dict) -> list[str]:
    by_shape, matrices = result["by_shape"], result["matrices"]
    baseline_seconds = {name: statistics.median(run[name]["seconds"] for run in result["baselines"])
                        for name in result["sampled"]}
    # The baseline on the whole checkpoint: each matrix's time, or its shape's sampled time.
    shape_seconds = {tuple(matrices[name]): seconds for name, seconds in baseline_seconds.items()}
    baseline_total = sum(shape_seconds[shape] * len(names) for shape, names in by_shape.items())
    estimate_seconds = statistics.median(seconds for seconds, _ in result["estimates"])
    certified_seconds, certified_rows = result["certified"]
    size = result["size"]
    rows = {row["name"]: row for row in result["estimates"][0][1]}
    errors = [abs(rows[name]["sigma"] - result["baselines"][0][name]["sigma"]) / result["baselines"][0][name]["sigma"]
              for name in result["sampled"]]
    certified = {row["name"]: row for row in certified_rows}
    lines = [
        f"### Llama-shaped bfloat16 checkpoint: {size / 1e9:.2f} GB, {len(matrices)} matrices in 3 shards",
        "",
        "| run | wall time [s] | full SVD / run | peak RSS [MiB] | peak RSS / checkpoint |",
        "|---|---:|---:|---:|---:|",
        f"| `lipnorm sigma DIR --no-bounds` (estimates) | {estimate_seconds:.1f} | "
        f"**{baseline_total / estimate_seconds:.1f}×** | {result['estimate_rss'] / 2**20:.0f} | "
        f"{result['estimate_rss'] / size:.2f} |",
        f"| `lipnorm sigma DIR` (estimates and certified intervals) | {certified_seconds:.1f} | "
        f"{baseline_total / certified_seconds:.1f}× | {result['certified_rss'] / 2**20:.0f} | "
        f"{result['certified_rss'] / size:.2f} |",
        f"| full SVD per matrix (`torch.linalg.svdvals`, float32) | {baseline_total:.1f}"
        f"{'' if len(result['sampled']) == len(matrices) else ' (sum over shapes)'} | 1× | "
        f"{result['baseline_rss'] / 2**20:.0f} | {result['baseline_rss'] / size:.2f} |",
        "",
        "| shape | matrices | svdvals [s] | lipnorm estimate [s] | lipnorm certified interval [s] |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape, names in by_shape.items():
        estimate = statistics.median(
            row["sigma_seconds"] for _, run in result["estimates"] for row in run if row["name"] in names)
        bounds = statistics.median(certified[name]["bounds_seconds"] for name in names)
        lines.append(f"| {shape[0]}×{shape[1]} | {len(names)} | {shape_seconds[shape]:.2f} | "
                     f"{estimate:.3f} | {bounds:.2f} |")
    inside = all(certified[name]["lower"] <= result["baselines"][0][name]["sigma"] * (1 + 1e-5)
                 and result["baselines"][0][name]["sigma"] * (1 - 1e-5) <= certified[name]["upper"]
                 for name in result["sampled"])
    lines += [
        "",
        f"σ of the {len(result['sampled'])} matrices the SVD ran on: lipnorm's estimate within "
        f"{max(errors):.1e} (relative) of `svdvals`' largest value (float32); the certified "
        f"intervals contain it within float32's SVD error (1e-5): {'yes' if inside else 'NO'}.",
        "",
    ]
    return lines


def memory_table(result: dict) -> list[str]:
    size = result["size"]
    lines = [
        f"### Sharded float32 checkpoint: {size / 1e9:.2f} GB of {FLOAT32_SHAPE[0]}×{FLOAT32_SHAPE[1]} "
        f"matrices ({result['largest'] / 2**20:.0f} MiB each) in {FLOAT32_SHARDS} shards",
        "",
        "| run | wall time [s] | peak RSS [MiB] | peak RSS / checkpoint (target < 0.6) |",
        "|---|---:|---:|---:|",
    ]
    for options, (seconds, rss, _) in result["runs"].items():
        command = f"lipnorm sigma DIR {options}".strip()
        lines.append(f"| `{command}` | {seconds:.1f} | {rss / 2**20:.0f} | **{rss / size:.2f}** |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full-baseline", action="store_true",
                        help="run the SVD on every matrix, not one per shape")
    parser.add_argument("--only", choices=("speed", "memory"))
    parser.add_argument("--threads", type=int, help="threads of each library (default: theirs)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--svd-baseline", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.svd_baseline:
        svd_baseline(args.svd_baseline, args.names.split(","))
        return
    parts = {"speed": lambda: speed_table(measure_speed(args.repeats, args.full_baseline, args.threads)),
             "memory": lambda: memory_table(measure_memory(args.threads))}
    try:
        for part in ([args.only] if args.only else parts):
            load_before = os.getloadavg()
            lines = parts[part]()
            write_results(part, lines, args, load_before)
    finally:
        if not args.keep:
            shutil.rmtree(BUILD, ignore_errors=True)


def write_results(part: str, lines: list[str], args: argparse.Namespace, load_before) -> None:
    """Write one part's table with the command, machine, versions, threads and load."""
    load_after = os.getloadavg()
    options = "".join([" --full-baseline" if args.full_baseline else "",
                       f" --only {part}",
                       f" --threads {args.threads}" if args.threads else ""])
    header = [
        "# `lipnorm sigma` on checkpoints: time against a full SVD per matrix, peak memory",
        "",
        f"`PYTHONPATH=. python benchmarks/bench_checkpoint.py{options}` · "
        f"{datetime.date.today()} · {os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()} · {versions()} · "
        f"{f'{args.threads} thread(s) per library' if args.threads else 'default threads'} · load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (a machine shared with other "
        f"jobs)" + (f" · median of {args.repeats} repeats for the estimates and the SVD, one run "
                    "with certified intervals." if part == "speed" else "."),
        "",
    ]
    results = RESULTS / f"bench_checkpoint_{part}{f'_threads{args.threads}' if args.threads else ''}.md"
    results.write_text("\n".join(header + lines))
    print(results.read_text(), flush=True)

if __name__ == "__main__":
    main()
