"""Export benchmark: a run's exported ONNX file in plain ONNX Runtime against `featurecache predict`, same images.

    python scripts/bench_export.py                  # makes a run: digit PNGs, efficientnet_lite0 (imagenet) 224px avg, logreg
    python scripts/bench_export.py --model vgg16 --weights hed-bsds --layer block4_pool --pool flatten --size 32 --head linsvc
    python scripts/bench_export.py --run RUN_ID --cache-dir cache

Every image is a new random-noise PNG at the run's input size, never seen by the cache, so `featurecache
predict` runs the network for each (a cached image would only measure an HDF5 read). Measured, in one run:

1. the exported file, in a child process that imports only numpy, Pillow and onnxruntime (asserted):
   session load; single-image latency (decode the PNG, run, read the label; p50/p90); batched throughput
   (decode + run in batches of --batch);
2. `featurecache predict` in this process (warm: TensorFlow imported, model built by the first call):
   one new image per call (p50/p90), and --images new images in one call (its batched path);
   the two take turns --reps times, so that both see the same load on a shared machine;
3. the `featurecache predict` command, as a user types it: one image, and --images images (process start included).
The labels of both on the batch are compared. Figures, command and CPU go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featurecache.api import default_engine
from featurecache.bench import cpu_model, predict_files, version, write_digit_images, write_section

ROOT = Path(__file__).resolve().parents[1]

PLAIN_ORT = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
from PIL import Image

model, batch, single = sys.argv[1], int(sys.argv[2]), sys.argv[3]
files = sys.argv[4:]
t0 = time.perf_counter()
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t0

def decode(f):
    return np.asarray(Image.open(f).convert("RGB"))

def label(paths):
    return sess.run(["label_name"], {"images": np.stack([decode(f) for f in paths])})[0]

for f in files[:3]:
    label([f])  # warm-up
lat = []
for f in json.loads(single):
    t0 = time.perf_counter()
    label([f])
    lat.append(time.perf_counter() - t0)
t0 = time.perf_counter()
out = [label(files[k:k + batch]) for k in range(0, len(files), batch)]
best = time.perf_counter() - t0
names = [str(n) for o in out for n in o]
assert "tensorflow" not in sys.modules and "sklearn" not in sys.modules
print(json.dumps({"load_s": load_s, "latency_s": lat, "batch_s": best, "labels": names, "ort": ort.__version__,
                  "threads": sess.get_session_options().intra_op_num_threads}))
"""


def cli(args: list[str], env: dict) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featurecache.cli", *args], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"featurecache {shlex.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout, time.perf_counter() - t0


def noise_pngs(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        p = folder / f"{seed}-{k:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a fitted run (default: make one on digit PNGs)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--layer", default=None)
    ap.add_argument("--pool", default="avg")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--head", default="logreg")
    ap.add_argument("--precision", default="float32", help="of the made run's features (int8: the file embeds the "
                    "run's int8 graph); its own section in docs/BENCHMARKS.md")
    ap.add_argument("--per-class", type=int, default=10, help="digit PNGs per class for the made run")
    ap.add_argument("--images", type=int, default=128, help="new images in the batched measurements")
    ap.add_argument("--single", type=int, default=30, help="single-image calls measured, for each side")
    ap.add_argument("--reps", type=int, default=5, help="turns the two sides take")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the exported file's batched run")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fc-export-bench-"))
    cache = args.cache_dir or work / "cache"
    env = dict(os.environ, FEATURECACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="3")
    load0 = os.getloadavg()
    if args.run:
        run_id = args.run
    else:
        data = work / "digits"
        write_digit_images(data, args.per_class, classes=range(10))
        fit = ["fit", "--data", str(data), "--model", args.model, "--weights", args.weights, "--pool", args.pool,
               "--size", str(args.size), "--head", args.head, "--precision", args.precision, "--extract", "--json",
               "--quiet"]
        if args.layer:
            fit += ["--layer", args.layer]
        run_id = json.loads(cli(fit, env)[0])["run_id"]
    record = json.loads((cache / "runs" / run_id / "run.json").read_text())
    size = record["size"]
    model = work / "model.onnx"
    _, export_s = cli(["export", "--run", run_id, "-o", str(model), "--force"], env)
    print(f"exported {run_id} to {model} ({model.stat().st_size / 1e6:.1f} MB) in {export_s:.1f} s", flush=True)

    # Distinct new images for every measurement: a second look at an image would be a cache hit.
    # The file and `featurecache predict` take turns, --reps times, so both see the same load on a shared machine.
    engine = default_engine()
    batch_imgs = noise_pngs(work / "batch", args.images, size, seed=1)
    t0 = time.perf_counter()
    predict_files(noise_pngs(work / "warm", 1, size, seed=2), run_id, cache, engine=engine)
    first_s = time.perf_counter() - t0
    ort_runs, lat, fc_batch, rows = [], [], [], None
    per_rep = max(1, args.single // args.reps)
    for rep in range(args.reps):
        singles = noise_pngs(work / f"single-ort-{rep}", per_rep, size, seed=100 + rep)
        proc = subprocess.run([sys.executable, "-c", PLAIN_ORT, str(model), str(args.batch),
                               json.dumps([str(p) for p in singles]), *map(str, batch_imgs)],
                              capture_output=True, text=True, cwd=work)
        if proc.returncode:
            sys.exit(f"plain onnxruntime run failed: {proc.stderr[-2000:]}")
        ort_runs.append(json.loads(proc.stdout))
        for p in noise_pngs(work / f"single-fc-{rep}", per_rep, size, seed=200 + rep):
            t0 = time.perf_counter()
            predict_files([p], run_id, cache, engine=engine)
            lat.append(time.perf_counter() - t0)
        imgs = batch_imgs if rep == 0 else noise_pngs(work / f"batch-{rep}", args.images, size, seed=300 + rep)
        t0 = time.perf_counter()
        out = predict_files(imgs, run_id, cache, engine=engine)
        fc_batch.append(time.perf_counter() - t0)
        rows = rows or out
        print(f"rep {rep + 1}: file {args.images / ort_runs[-1]['batch_s']:.1f} images/s, "
              f"featurecache predict {args.images / fc_batch[-1]:.1f} images/s", flush=True)
    ort = {"ort": ort_runs[0]["ort"], "load_s": min(r["load_s"] for r in ort_runs),
           "latency_s": [x for r in ort_runs for x in r["latency_s"]], "batch_s": min(r["batch_s"] for r in ort_runs)}
    agree = sum(r["label"] == n for r, n in zip(rows, ort_runs[0]["labels"]))

    one = noise_pngs(work / "cli-one", 1, size, seed=5)
    many = noise_pngs(work / "cli-many", args.images, size, seed=6)
    _, cli_one_s = cli(["predict", str(one[0]), "--run", run_id], env)
    _, cli_many_s = cli(["predict", *map(str, many), "--run", run_id], env)
    load1 = os.getloadavg()

    n = args.images
    ort_ips = sorted(n / r["batch_s"] for r in ort_runs)
    fc_ips = sorted(n / t for t in fc_batch)
    table = "\n".join([
        "| what | single image p50 / p90 (ms) | batched, best (median) of turns (images/s) | start-up |",
        "| --- | ---: | ---: | --- |",
        f"| exported file, plain ONNX Runtime {ort['ort']} (decode + run, batch {args.batch}) | "
        f"{pct(ort['latency_s'], 50):.1f} / {pct(ort['latency_s'], 90):.1f} | {ort_ips[-1]:.1f} "
        f"({np.median(ort_ips):.1f}) | session load {ort['load_s'] * 1000:.0f} ms |",
        f"| `featurecache predict`, Python API in a warm process (engine {engine}) | {pct(lat, 50):.1f} / "
        f"{pct(lat, 90):.1f} | {fc_ips[-1]:.1f} ({np.median(fc_ips):.1f}) | first call {first_s:.1f} s |",
        f"| `featurecache predict` command (process start included) | {cli_one_s * 1000:.0f} (one run) | "
        f"{n / cli_many_s:.1f} ({n} files, one command) | in the figures |",
    ])
    ratio_single = pct(lat, 50) / pct(ort["latency_s"], 50)
    ratio_batch = ort_ips[-1] / fc_ips[-1]
    ratio_median = float(np.median(ort_ips) / np.median(fc_ips))
    body = f"""Command: `{shlex.join(["python", "scripts/bench_export.py", *sys.argv[1:]])}`

CPU: {cpu_model()}, {os.cpu_count()} cores shared with other work (load average {load0[0]:.2f} before,
{load1[0]:.2f} after). Run {run_id}: {record['features']} -> {record['head']}; exported file
{model.stat().st_size / 1e6:.1f} MB, written in {export_s:.1f} s (`featurecache export`, TensorFlow start-up included).
onnxruntime {version('onnxruntime')}, tensorflow {version('tensorflow')},
skl2onnx {version('skl2onnx')}; the file runs with ONNX Runtime's default session options (as a user's program would), `featurecache predict` with its engine's own settings.

Every image is a new random-noise PNG at {size}x{size} (never in the cache: `featurecache predict` runs the
network for each). Single image: {args.single} calls after a warm-up, each decoding one PNG and returning its
label. Batched: {n} images in one call, best of {args.reps}. The two sides take turns {args.reps} times (the file in a
fresh plain-ONNX-Runtime process each turn; `featurecache predict` on new images each turn), so both see the
same load. Both gave the same label on {agree} of {n} batch images.

{table}

In one warm process the exported file answers a single image **{ratio_single:.1f}x** faster than
`featurecache predict` (each call of which, at this commit, makes its engine session again, hashes the
images and reads and writes the feature cache), and its batched throughput is **{ratio_batch:.2f}x** that of `featurecache predict` (best turns;
{ratio_median:.2f}x on the medians). With the load average above the core count, single figures move by
several times between turns: compare the two rows of one run, not figures of different runs.
"""
    print(body)
    if not args.no_write:
        precision = record.get("spec", {}).get("precision", "float32")
        title = "Export (scripts/bench_export.py)" if precision == "float32" else \
            f"Export, {precision} run (scripts/bench_export.py --precision {precision})"
        write_section(ROOT / "docs" / "BENCHMARKS.md", title, body)


if __name__ == "__main__":
    main()
