"""Training-step time of Keras spectral normalization, relative to the unnormalized model.

Side by side in one process per Keras backend: no normalization, Keras's own
``keras.layers.SpectralNormalization`` and ``lipnorm.backends.keras.SpectralNormalization``
(which also differentiates through sigma). Models: an MLP 1024->4096->4096->1 at
batch 64 and 8, and a DCGAN-style discriminator on 32x32x3 at batch 64. The step
is Keras's train function (``train_on_batch``): a ``tf.function`` graph on the
TensorFlow backend (``jit_compile=False``), ``jax.jit`` on the JAX backend, eager
PyTorch on the torch backend.

Run ``python benchmarks/bench_keras_sn.py`` from the repository root; it starts one
subprocess per backend and writes benchmarks/results/bench_keras_sn.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "bench_keras_sn.md")
BACKENDS = ("tensorflow", "jax", "torch")
VARIANTS = ("none", "keras", "lipnorm")
CASES = (("mlp", 64), ("mlp", 8), ("dcgan_d", 64))


def build_model(keras, case, variant):
    """The benchmark model with every Dense/Conv wrapped according to ``variant``."""
    from lipnorm.backends.keras import SpectralNormalization

    wrap = {
        "none": lambda layer: layer,
        "keras": keras.layers.SpectralNormalization,
        "lipnorm": SpectralNormalization,
    }[variant]
    layers = keras.layers
    if case == "mlp":
        body = [
            keras.Input((1024,)),
            wrap(layers.Dense(4096, activation="relu")),
            wrap(layers.Dense(4096, activation="relu")),
            wrap(layers.Dense(1)),
        ]
    else:
        body = [keras.Input((32, 32, 3))]
        for filters in (64, 128, 256):
            body += [wrap(layers.Conv2D(filters, 4, strides=2, padding="same")), layers.LeakyReLU(0.2)]
        body += [layers.Flatten(), wrap(layers.Dense(1))]
    model = keras.Sequential(body)
    model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse", jit_compile=False)
    return model


def measure(backend, repeats, steps):
    """Median seconds per training step for every (case, variant), in this process."""
    import numpy as np

    import keras

    assert keras.backend.backend() == backend
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    results = {}
    for case, batch in CASES:
        shape = (batch, 1024) if case == "mlp" else (batch, 32, 32, 3)
        x = rng.standard_normal(shape).astype("float32")
        y = rng.standard_normal((batch, 1)).astype("float32")
        models = {v: build_model(keras, case, v) for v in VARIANTS}
        for model in models.values():
            for _ in range(3):  # trace / compile, warm caches
                model.train_on_batch(x, y)
        times = {v: [] for v in VARIANTS}
        for _ in range(repeats):  # interleaved, so load changes hit every variant alike
            for variant, model in models.items():
                start = time.perf_counter()
                for _ in range(steps):
                    loss = model.train_on_batch(x, y)
                float(np.asarray(loss))
                times[variant].append((time.perf_counter() - start) / steps)
        results[f"{case}@{batch}"] = {v: float(np.median(t)) for v, t in times.items()}
    return results


def run_backend(backend, repeats, steps):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
    command = [sys.executable, __file__, "--child", "--repeats", str(repeats), "--steps", str(steps)]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def versions():
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("keras", "tensorflow-cpu", "jax", "torch", "numpy"))


def write_table(all_results, repeats, steps):
    lines = [
        "# Keras spectral normalization: training-step time",
        "",
        "Median seconds per compiled training step (`train_on_batch`, SGD, MSE) and the",
        "ratio to the same model without normalization. `keras` is",
        "`keras.layers.SpectralNormalization` (no gradient through sigma); `lipnorm` is",
        "`lipnorm.backends.keras.SpectralNormalization` (gradient through sigma).",
        "TensorFlow: `tf.function` graph (`jit_compile=False`); JAX: `jax.jit`; torch: eager.",
        "",
        "| backend | model | batch | none (ms) | keras SN (ms) | lipnorm SN (ms) | keras / none | lipnorm / none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend, results in all_results.items():
        for key, t in results.items():
            case, batch = key.split("@")
            model = "MLP 1024-4096-4096-1" if case == "mlp" else "DCGAN D 32x32x3"
            lines.append(
                f"| {backend} | {model} | {batch} | {1e3 * t['none']:.2f} | {1e3 * t['keras']:.2f} "
                f"| {1e3 * t['lipnorm']:.2f} | {t['keras'] / t['none']:.2f}x "
                f"| {t['lipnorm'] / t['none']:.2f}x |"
            )
    lines += [
        "",
        f"Medians of {repeats} interleaved rounds of {steps} steps after 3 warm-up steps.",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
        f"{os.getloadavg()[0]:.1f} at the end.",
        f"Libraries: {versions()}.",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
    ]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(os.environ["KERAS_BACKEND"], args.repeats, args.steps)))
        return
    results = {b: run_backend(b, args.repeats, args.steps) for b in args.backends}
    write_table(results, args.repeats, args.steps)


if __name__ == "__main__":
    main()
