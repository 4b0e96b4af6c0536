"""`featurecache plan`: what an extraction would cost, before paying for it.

Images still to compute come from the same store lookups extraction makes (`extract.pending`); the
time comes from a short measured warm-up on the images themselves (decode, preprocess and the chosen
engine, one batch to warm up, then up to `probe` images timed); the disk size is exact up to HDF5's
small per-part overhead: uncompressed float32 vectors plus a 32-byte id per row.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..encoding.encoder import Encoder, measure_rate
from ..engines import choose
from .extract import Pending, calibration_items, pending
from ..settings import (INT8_RECIPE, PRECISIONS, FeatureSpec, Resolved, RunSettings, calibrated,
                        calibration_sample, resolve)
from ..store.sets import ID_DTYPE, FeatureStore
from ..encoding.taps import catalogue, check_layers

ID_BYTES = np.dtype(ID_DTYPE).itemsize


def run_plan(ds, spec: FeatureSpec, run: RunSettings, probe: int = 128) -> dict:
    """What extracting `spec` for `ds` would cost: images to compute, expected seconds, disk bytes."""
    spec = calibrated(spec, ds.train.images.ids)
    choose(run.engine, spec.precision)  # a bad --engine fails even on a cache hit
    res = resolve(spec, ds.native_size(), run.cache_dir)
    sources = [ds.train.images, ds.test.images]
    p = pending(sources, res, FeatureStore(run.cache_dir))
    taps = check_layers(res.backbone, res.layers, catalogue(res.backbone, res.size, run.cache_dir))
    layers = []
    for tap in taps:
        fs, need = p.sets[tap.name], len(p.need[tap.name])
        row = tap.dims(res.pool) * 4 + ID_BYTES
        stored = len(fs) if fs is not None else 0
        layers.append({"layer": tap.name, "set": res.set_ids[tap.name], "dims": tap.dims(res.pool),
                       "stored": stored, "to_compute": need, "bytes_to_add": need * row,
                       "bytes_after": (stored + need) * row})
    out = {"model": res.backbone.name, "weights": res.weights.label, "size": res.size, "precision": res.precision.name,
           "images": len(p.ids), "to_compute": len(p.todo), "layers": layers,
           "bytes_to_add": sum(r["bytes_to_add"] for r in layers),
           "bytes_after": sum(r["bytes_after"] for r in layers), "engine": None, "setup_seconds": 0.0,
           "measured_images_per_second": None, "expected_seconds": 0.0, "skipped": []}
    if p.todo:
        names = [t.name for t in taps if p.need[t.name]]
        out.update(_warm_up(res, p, names, run, probe))
        out["engines_measured"] = _measured(res, names, run)
    out["precisions"] = _precisions(res, ds, run)
    return out


def _measured(res: Resolved, names: list[str], run: RunSettings) -> dict | None:
    """auto's remembered measurement of these taps on this machine (engines/choice.py), if there is one."""
    from ..engines import choice
    from ..engines.graphs import Graph

    return choice.remembered(run.cache_dir, Graph(res.backbone.name, res.weights.id, res.size, tuple(names)))


def _precisions(res: Resolved, ds, run: RunSettings) -> list[dict]:
    """The other precisions this machine could run, each a separate feature set, with the evidence at
    hand for what it saves and costs: its speed against float32's on OpenVINO, timed now on graphs
    already converted for these taps, and the test accuracy of runs in this cache fitted alike at both
    precisions (docs/BENCHMARKS.md has the same on the full Fashion-MNIST)."""
    from ..engines import choice, installed

    ov, nncf = installed("openvino"), importlib.util.find_spec("nncf") is not None
    # an int8 plan already named its sample (`calibrated`); otherwise name the one int8 would use
    calibration = res.precision.calibration or (calibration_sample(ds.train.images.ids)[1] if len(ds.train.images) else "")
    rates = _rates(res, run, calibration) if ov else {}
    accuracy = _run_pairs(res, run.cache_dir)
    out = []
    for name in PRECISIONS:
        if name == res.precision.name:
            continue
        row = {"precision": name}
        if name == "bf16":
            row["available"] = ov and choice.has_bf16()
            row["why"] = ("bfloat16 arithmetic on OpenVINO (this CPU has AVX512_BF16 or AMX)" if row["available"] else
                          "needs a CPU with AVX512_BF16 or AMX, and openvino" if not choice.has_bf16() else
                          "needs openvino (`pip install openvino onnx`)")
        elif name == "int8":
            row["available"] = ov and nncf
            row["why"] = (f"nncf's post-training quantisation, calibrated on {INT8_RECIPE['samples']} of your training "
                          "images, on OpenVINO"
                          if row["available"] else "needs openvino and nncf (`pip install openvino onnx nncf`)")
        else:
            row["available"], row["why"] = True, "the reference precision"
        if rates.get(name) and rates.get("float32") and name != "float32":
            row["speed"] = {"images_per_second": round(rates[name], 1), "float32": round(rates["float32"], 1),
                            "ratio": round(rates[name] / rates["float32"], 2)}
        if name != "float32" and accuracy.get(name):
            row["accuracy"] = accuracy[name]
        out.append(row)
    return out


def _rates(res: Resolved, run: RunSettings, calibration: str) -> dict[str, float]:
    """Images/s on OpenVINO per precision whose graph for these taps is already in the cache (no network
    build or calibration is paid for a plan; at most the cached ONNX graph's one-time conversion to OpenVINO
    IR); a precision without one is left out."""
    from ..engines import choice
    from ..engines.graphs import Graph, int8_graph
    from ..settings import Precision

    graph = Graph(res.backbone.name, res.weights.id, res.size, tuple(res.layers))
    cached = {"float32": (graph.folder(run.cache_dir) / "model.onnx").is_file()}
    cached["bf16"] = cached["float32"] and choice.has_bf16()
    cached["int8"] = bool(calibration) and int8_graph(run.cache_dir, graph, calibration) is not None
    rates = {}
    for name, ok in cached.items():
        if not ok:
            continue
        try:
            enc = Encoder(_at_precision(res, Precision(name, calibration if name == "int8" else "")), run.cache_dir,
                          "openvino", "fail", res.layers).load()
            rates[name] = _pixel_rate(enc)
        except Exception as e:  # evidence, not the plan: a graph that will not run is left out, said why
            run.say(f"notice: could not time {name} for the plan ({str(e).splitlines()[0][:160]})")
    return rates


def _at_precision(res: Resolved, precision) -> Resolved:
    """`res` at another precision (settings.Precision): the same network and taps, other sets."""
    other = replace(res, precision=precision,
                    spec=replace(res.spec, precision=precision.name, calibration=precision.calibration))
    return other.with_sets({layer: other.key(layer) for layer in other.layers})


def _pixel_rate(enc: Encoder, images: int = 32) -> float:
    """Images/s of `enc` on seeded random pixels (values do not change a forward pass's speed), after one
    warm-up pass that builds the engine's kernels; nothing decoded, so only the network and pooling count."""
    pixels = np.random.default_rng(0).integers(0, 256, (images, enc.size, enc.size, 3), dtype=np.uint8)
    return measure_rate(lambda chunk: enc.encode_pixels(pixels[chunk]), list(range(images)), images, images,
                        time.perf_counter())[1]


def _run_pairs(res: Resolved, cache_dir: Path) -> dict[str, list[dict]]:
    """Runs in this cache on these taps that differ only in precision: test accuracy at each, per precision."""
    import json

    from ..errors import FeatureCacheError
    from ..runs.record import load, runs_dir

    groups: dict[str, dict] = {}
    for path in sorted(runs_dir(cache_dir).glob("*/run.json")):
        try:
            r = load(cache_dir, path.parent.name)
            key = r.feature_key
            same = (key["model"], key["weights"], key["size"], key["resize"], key["preprocess"]) == \
                (res.backbone.name, res.weights.id, res.size, res.resize, res.preprocess_mode)
            if not same or not set(r.layers) <= set(res.layers):
                continue
            group = json.dumps([r.data_options, r.features, r.head, r.head_params, r.normalize, r.pca,
                                list(r.augment), r.tta], sort_keys=True, default=str)
            groups.setdefault(group, {})[r.precision] = r  # sorted by id, so the newest run wins
        except (OSError, FeatureCacheError, KeyError, TypeError, ValueError):
            continue
    out: dict[str, list[dict]] = {}
    for runs in groups.values():
        if "float32" not in runs:
            continue
        base = runs["float32"]
        for name, r in runs.items():
            if name == "float32":
                continue
            a, b = base.metrics["test_accuracy"], r.metrics["test_accuracy"]
            out.setdefault(name, []).append({
                "features": r.features, "head": r.head, "data": r.data_options["data"],
                "test_images": r.n_test, "float32": a, name: b, "delta_points": round(100 * (b - a), 2),
                "runs": [base.id, r.id]})
    return out


def _warm_up(res: Resolved, p: Pending, names: list[str], run: RunSettings, probe: int) -> dict:
    """Build the encoder on the engine, run one batch, time up to `probe` images; extrapolate.
    Unreadable images stop the plan (on_error="fail") or are left out and listed ("skip"), as in extract."""
    t0 = time.perf_counter()
    enc = Encoder(res, run.cache_dir, run.engine, run.on_error, names,
                  calibration=lambda: calibration_items(res, p.src), log=run.say, measure=True).load()
    positions = [p.first[i] for i in p.todo]
    if run.executor == "ray":  # one actor on the cluster measured, scaled by the actors its CPUs hold
        from .cluster import estimate

        return estimate(enc, p.src, positions, run, probe)
    batch = min(run.batch_size, len(positions))
    skipped = {}

    def encode(chunk) -> None:
        b = enc.prepare([p.src.item(k) for k in chunk], [p.src.name(k) for k in chunk], chunk)
        skipped.update((p.src.name(k), why) for k, why in b.skipped.items())
        enc.run(b)

    setup, ips, timed = measure_rate(encode, positions, batch, probe, t0)
    return {"engine": enc.engine, "setup_seconds": round(setup, 2), "measured_images_per_second": round(ips, 1),
            "measured_images": timed, "expected_seconds": round(setup + len(p.todo) / ips, 1),
            "skipped": [{"name": n, "reason": r} for n, r in skipped.items()]}


def describe(out: dict) -> str:
    def mb(n: int) -> str:
        return f"{n / 1e6:,.1f} MB"

    lines = [f"{out['model']} ({out['weights']}) at {out['size']}px, {out['precision']}: {out['images']:,} images, "
             f"{out['to_compute']:,} to compute after the cache"]
    for r in out["layers"]:
        lines.append(f"  {r['layer']:<24} set {r['set']}  dims {r['dims']:>6}  stored {r['stored']:>7,}  "
                     f"to compute {r['to_compute']:>7,}  disk +{mb(r['bytes_to_add'])} -> {mb(r['bytes_after'])}")
    if out["to_compute"] and out.get("executor") == "ray":
        lines.append(f"expected time: {out['expected_seconds']:,.0f} s on a Ray cluster of {out['cluster_cpus']} CPUs: "
                     f"{out['workers']} actor(s) x {out['threads_per_worker']} thread(s) on {out['engine']}, "
                     f"{out['per_worker_images_per_second']} images/s per actor measured on {out['measured_images']} "
                     f"of them (plus {out['setup_seconds']:.1f} s to start Ray and an actor and warm up)")
    elif out["to_compute"]:
        lines.append(f"expected time: {out['expected_seconds']:,.0f} s on {out['engine']} "
                     f"({out['measured_images_per_second']} images/s measured on {out['measured_images']} of them, "
                     f"plus {out['setup_seconds']:.1f} s to build and warm up)")
    else:
        lines.append("nothing to compute: a cache hit")
    measured = out.get("engines_measured")
    if measured:
        rates = sorted(measured["images_per_second"].items(), key=lambda kv: -kv[1])
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(measured["measured_at"]))
        lines.append("engines measured by auto on this machine (" + when + "): "
                     + ", ".join(f"{e} {r} images/s" for e, r in rates) + f"; auto runs {measured['engine']}")
    for p in out.get("precisions", []):
        lines.append(f"  --precision {p['precision']}: {'available' if p['available'] else 'not available'}, "
                     f"{p['why']}; a separate feature set")
        if p.get("speed"):
            sp = p["speed"]
            lines.append(f"      speed measured now on openvino: {sp['ratio']:.2f}x float32 "
                         f"({sp['images_per_second']} vs {sp['float32']} images/s)")
        for a in p.get("accuracy", [])[:3]:
            lines.append(f"      accuracy on your runs: {a['head']} on {a['features']} ({a['data']}, {a['test_images']} "
                         f"test images): {a['float32']:.4f} float32, {a[p['precision']]:.4f} {p['precision']} "
                         f"({a['delta_points']:+.2f} points)")
        if len(p.get("accuracy", [])) > 3:
            lines.append(f"      and {len(p['accuracy']) - 3} more pair(s) of runs (--json lists them all)")
        if p["precision"] != "float32" and p["available"] and not p.get("speed") and not p.get("accuracy"):
            lines.append("      no evidence in this cache yet (extract and fit once at this precision); "
                         "docs/BENCHMARKS.md has speed and accuracy on Fashion-MNIST")
    if out.get("skipped"):
        lines.append(f"left out {len(out['skipped'])} unreadable image(s) of the warm-up (--on-error skip)")
    lines.append(f"disk: +{mb(out['bytes_to_add'])}, {mb(out['bytes_after'])} for these feature sets in all")
    return "\n".join(lines)
