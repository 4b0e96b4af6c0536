"""`featurecache export`: a fitted run as one portable ONNX file, image in, label out.

    featurecache export --run ID [-o model.onnx] [--force]     write the file
    featurecache export --check model.onnx [--data D]         run it with plain ONNX Runtime on the run's
                                                              test images; compare with `featurecache predict`

The file holds the preprocessing, the backbone up to the run's taps (featurecache's own Keras->ONNX
exporter, or the run's int8 graph), each tap's pooling (stored or a fit-time view) with the blocks joined
in the run's order, the normaliser / PCA / head (skl2onnx) and the glue between them
(featurecache/export/graph.py); it takes uint8 RGB images (N, S, S, 3) already resized to the run's
input size S (the metadata names S and the resize method) and returns `scores`, `label`, `label_name`.
Running it needs only ONNX Runtime: no Python, TensorFlow or scikit-learn (docs/EXPORT.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import FeatureCacheError
from ..runs.record import Run, load_head
from ..settings import RunSettings

FORMATS = ("onnx",)
PRECISIONS = ("float32", "int8")
PROBE_ROWS = 256
SCORE_TOL = 1e-4  # relative to the scores' scale: what the test suite holds the file to


def _say(log, msg):
    if log:
        log(msg)


def exportable_heads() -> list[str]:
    """featurecache heads whose fitted estimator has a converter (skl2onnx, plus ours)."""
    from . import graph as export_graph
    from .. import heads

    names = []
    for name in heads.head_names():
        try:
            est = heads.make_head(name)
        except Exception:  # a head that cannot be built bare cannot be checked here either
            continue
        if export_graph.convertible(est):
            names.append(name)
    return names


def _check_request(fmt: str, precision: str | None, run: Run) -> None:
    if fmt not in FORMATS:
        raise FeatureCacheError(f"--format {fmt}: unknown; use {', '.join(FORMATS)}")
    if precision is not None and precision not in PRECISIONS:
        raise FeatureCacheError(f"--precision {precision}: unknown; use one of {', '.join(PRECISIONS)}")
    if run.tta:
        raise FeatureCacheError(f"--run {run.id}: averages test-time views (--tta); export a run "
                                "fitted without --tta")
    fitted = run.precision
    if precision is not None and precision != fitted:
        raise FeatureCacheError(
            f"--precision {precision}: run {run.id} was fitted on {fitted} features, and a file must feed "
            f"its head the vectors it was fitted on; fit a head on --precision {precision} features and export "
            f"that run, or drop --precision")
    if fitted not in PRECISIONS:
        raise FeatureCacheError(f"--run {run.id}: fitted on {fitted} features, which do not export; "
                                f"exported precisions: {', '.join(PRECISIONS)}")


def _probe_rows(run: Run, cache_dir: Path, dims: int) -> np.ndarray:
    """Rows to hold the converted head to the pickled one: cached vectors of the run's set, plus random ones."""
    rows = []
    try:
        from ..store.sets import FeatureStore

        fs = FeatureStore(cache_dir).get(run.feature_set)
        if fs is not None and fs.dims == dims:
            rows.append(fs.gather(list(fs.index())[:PROBE_ROWS]))
    except Exception:  # the cache may have been cleaned: random rows still test the conversion
        pass
    rng = np.random.default_rng(0)
    rows.append(np.abs(rng.normal(size=(32, dims))).astype(np.float32))
    return np.concatenate(rows).astype(np.float32)


def head_part(run: Run, pipeline, dims: int, cache_dir: Path, log=None):
    """(ONNX of features -> scores/label/label_name, score kind, largest probe difference, head classes)."""
    from . import graph as eg
    from ..heads import scores

    try:
        skl = eg.sklearn_model(pipeline, dims)
    except eg.NoConverter as e:
        raise FeatureCacheError(f"--run {run.id}: head {run.head!r} has no ONNX converter ({e}); "
                                f"heads that export: {', '.join(exportable_heads())}") from None
    probe = _probe_rows(run, cache_dir, dims)
    ref = scores(pipeline, probe.copy())  # the normaliser works in place: keep the probe intact
    raw_name = eg.score_output(skl)
    raw = _run_proto(skl, raw_name, probe).reshape(len(probe), -1)
    _declare_columns(skl, raw_name, raw.shape[1])
    scale = max(1.0, float(np.abs(ref.values).max()))
    adapter, err = eg.choose_adapter(raw, ref.values, ref.kind, SCORE_TOL * scale)
    if err <= SCORE_TOL * scale:
        post = eg.post_model("head/" + raw_name, raw.shape[1], adapter, [int(c) for c in ref.classes],
                             list(run.class_names))
        head = eg.merge(eg.prefixed(skl, "head/"), post, [("head/" + raw_name, "head/" + raw_name)],
                        outputs=["scores", "label", "label_name"])
        got = _run_proto(head, "scores", probe, "head/" + eg.FEATURES)  # the joined part, as the file will run it
        err = float(np.abs(got - ref.values).max()) if got.shape == ref.values.shape else float("inf")
    if not err <= SCORE_TOL * scale:
        raise FeatureCacheError(f"--run {run.id}: the ONNX conversion of head {run.head!r} does not "
                                f"reproduce its scores (largest difference {err:.3g}); heads that export: "
                                f"{', '.join(exportable_heads())}")
    _say(log, f"head: {type(pipeline[-1]).__name__ if hasattr(pipeline, 'steps') else type(pipeline).__name__} "
              f"converted; {ref.kind} scores within {err:.2g} of the pickled head on {len(probe)} probe rows")
    return head, ref.kind, err, [int(c) for c in ref.classes]


def _declare_columns(proto, name: str, cols: int) -> None:
    """Declare the columns skl2onnx's score tensor really has: for two-class LinearSVC and Ridge it declares
    (N, 2) and gives (N, 1), which ONNX Runtime would warn about on every run of the file."""
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name == name and len(dims) == 2:
            dims[1].dim_value = cols


def _run_proto(proto, output: str, x: np.ndarray, input_name: str | None = None) -> np.ndarray:
    from . import graph as eg
    from .runtime import session

    fd, path = tempfile.mkstemp(suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        return session(path).run([output], {input_name or eg.FEATURES: x})[0]
    finally:
        os.unlink(path)


def backbone_part(run: Run, cache_dir: Path, log=None):
    """(ONNX of uint8 images -> the run's vectors, their dims): our exporter on the rebuilt backbone, or the
    run's own int8 graph for a run fitted on int8 features, with one output per tap; each tap pooled into
    its block (a stored pooling or a fit-time view), the blocks concatenated in the run's order."""
    from . import graph as eg
    from ..backbones import get_backbone
    from ..backbones.weights import resolve_weights

    blocks = [(b.layer, b.pool) for b in run.blocks]
    taps = list(dict.fromkeys(layer for layer, _ in blocks))
    key = run.feature_key
    backbone = get_backbone(key["model"])
    weights = resolve_weights(backbone, run.spec.weights, run.spec.seed, cache_dir)
    if weights.id != key["weights"]:
        raise FeatureCacheError(f"--run {run.id}: the weights {weights.label!r} are now {weights.id}, but "
                                f"the run's features came from {key['weights']}; fit the head again")
    from ..engines import onnx_export

    if run.precision == "int8":
        proto = _int8_backbone(run, key, taps, cache_dir, log)
    else:
        from ..backbones.build import build_model

        _say(log, f"backbone: building {backbone.name} at {key['size']}px to {', '.join(taps)} ({weights.label})")
        model = build_model(backbone, weights, int(key["size"]))
        try:
            proto = onnx_export.export(model, taps)
        except onnx_export.Unsupported as e:
            raise FeatureCacheError(f"--run {run.id}: cannot write {backbone.name} as ONNX ({e})") from None
    net, dims = eg.pooled(proto, blocks, "backbone/")
    pre = eg.preprocess_model(int(key["size"]), key["preprocess"], "backbone/" + onnx_export.INPUT)
    return eg.merge(pre, net, [("backbone/" + onnx_export.INPUT, "backbone/" + onnx_export.INPUT)],
                    outputs=[eg.FEATURES]), dims


def _int8_backbone(run: Run, key: dict, taps: list[str], cache_dir: Path, log=None):
    """The int8 QDQ graph the run's features came from (engines/int8.py), cut to the run's taps: no
    requantising, so the file's backbone is the run's own; only the kernels that run it differ."""
    import onnx

    from ..engines.graphs import Graph, int8_graph
    from ..engines.onnx_export import INPUT, output_name
    from ..settings import Precision, is_current

    calibration = Precision.parse(key["precision"]).calibration
    if not is_current(calibration):
        raise FeatureCacheError(f"--run {run.id}: fitted on int8 features of an earlier featurecache "
                                "(an OpenVINO IR, which has no ONNX writer); extract with --precision int8 again, "
                                "fit the head on them and export that run")
    def graph(of):
        return int8_graph(cache_dir, Graph(key["model"], key["weights"], int(key["size"]), tuple(of)), calibration)

    path, groups = graph(taps), {}
    if path is not None:
        groups[path] = taps
    else:  # taps extracted at different times came from different graphs: each tap from its own
        for tap in taps:
            if (one := graph([tap])) is None:
                raise FeatureCacheError(f"--run {run.id}: the int8 graph of {tap} (calibration "
                                        f"{calibration}) is not in the cache; run `featurecache extract --precision "
                                        "int8` with the run's settings on its training data to recreate it")
            groups.setdefault(one, []).append(tap)
    parts = []
    for path, group in groups.items():
        _say(log, f"backbone: the run's int8 graph {path} ({', '.join(group)})")
        proto = onnx.load(str(path))
        wanted = [output_name(t) for t in group]
        if sorted(o.name for o in proto.graph.output) != sorted(wanted):  # made for other taps: keep what these need
            proto = onnx.utils.Extractor(proto).extract_model([INPUT], wanted)
        parts.append(proto)
    from .graph import side_by_side

    return parts[0] if len(parts) == 1 else side_by_side(parts, INPUT)


def metadata(run: Run, kind: str, classes) -> dict[str, str]:
    key = run.feature_key
    names = list(run.class_names)
    return {
        "class_names": json.dumps(names),
        "score_classes": json.dumps([names[int(c)] for c in classes]),
        "score_kind": kind,
        "run_id": run.id,
        "feature_key": json.dumps(key, sort_keys=True),
        "blocks": json.dumps([{"layer": b.layer, "pool": b.pool} for b in run.blocks]),
        "features": run.features,
        "method": run.describe(),
        "head": run.head,
        "normalize": str(run.normalize),
        "pca": str(run.pca),
        "input_size": str(key["size"]),
        "input": f"images: uint8 (N, {key['size']}, {key['size']}, 3) RGB, resized by the caller",
        "resize": key["resize"],  # auto: a rule per image (a folder of mixed sizes), spelt out below
        "resize_rule": "nearest when neither side shrinks, else bilinear (Pillow's, antialiased)"
        if key["resize"] == "auto" else key["resize"],
        "precision": run.precision,
        "featurecache_version": __version__,
        "outputs": "scores (N, K) float32 in score_classes order; label (N,) int64 index into class_names; "
                   "label_name (N,) string",
    }


@dataclass(frozen=True)
class ExportRequest:
    """What `featurecache export` is asked to write: which run, where, in which format and precision."""
    run_id: str
    output: Path | None = None  # default: <run id>.onnx here
    fmt: str = "onnx"
    precision: str | None = None  # only the run's own precision (it may be repeated, not changed)
    force: bool = False  # overwrite an existing file


def export_run(request: ExportRequest, settings: RunSettings) -> dict:
    """Write the run `request` names as one ONNX file; returns a summary (path, sizes, checks)."""
    t0 = time.perf_counter()
    run_id, cache_dir, log = request.run_id, settings.cache_dir, settings.say
    run, pipeline = load_head(cache_dir, run_id)
    _check_request(request.fmt, request.precision, run)
    out = Path(request.output) if request.output else Path(f"{run_id}.onnx")
    if out.exists() and not request.force:
        raise FeatureCacheError(f"-o {out}: exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise FeatureCacheError(f"-o {out}: is a folder; give a file name such as {out / (run_id + '.onnx')}")
    if run.dims and hasattr(pipeline, "n_features_in_") and int(pipeline.n_features_in_) != run.dims:
        raise FeatureCacheError(f"--run {run_id}: head takes {pipeline.n_features_in_} features, the run says "
                                f"{run.dims}; fit the head again")
    head, kind, err, classes = head_part(run, pipeline, run.dims, cache_dir, log)  # fails before TF loads
    net, dims = backbone_part(run, cache_dir, log)
    if dims != run.dims:
        raise FeatureCacheError(f"--run {run_id}: the rebuilt backbone gives {dims} features, the head takes "
                                f"{run.dims}; fit the head again")
    from . import graph as eg

    full = eg.merge(net, head, [(eg.FEATURES, "head/" + eg.FEATURES)], outputs=["scores", "label", "label_name"])
    import onnx

    full.graph.name = f"featurecache {run_id}"
    full.producer_name, full.producer_version = "featurecache", __version__
    full.doc_string = (f"featurecache run {run_id}: {run.features} -> {run.head}. "
                       "Input uint8 RGB NHWC at the input_size in metadata; outputs scores, label, label_name.")
    full.graph.doc_string = full.doc_string  # merge_models's would name skl2onnx's random graph ids: same run, same bytes
    del full.metadata_props[:]
    for k, v in metadata(run, kind, classes).items():
        full.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(full, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:  # never a half-written file under the name asked for
        tmp.write_bytes(full.SerializeToString())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "run_id": run_id, "bytes": out.stat().st_size, "input_size": run.size,
            "features": run.features, "method": run.describe(), "head": run.head, "score_kind": kind,
            "head_max_difference": err, "seconds": round(time.perf_counter() - t0, 2)}


# ---- --check ----------------------------------------------------------------------------------------

def run_file(model: Path, images: np.ndarray) -> dict:
    """Run the file in a child process that imports only numpy and onnxruntime; its outputs and what it loaded."""
    with tempfile.TemporaryDirectory(prefix="fc-export-check-") as tmp:
        src, dst = Path(tmp) / "images.npy", Path(tmp) / "out.npz"
        np.save(src, images)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "featurecache.export.runtime", str(model), str(src), str(dst)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise FeatureCacheError(f"--check {model}: ONNX Runtime could not run it ({last[:300]})")
        with np.load(dst) as z:
            return {k: z[k] for k in z.files}


def _read_meta(model: Path) -> dict:
    from .runtime import metadata, session

    if not Path(model).is_file():
        raise FeatureCacheError(f"--check {model}: no such file")
    try:
        meta = metadata(session(str(model)))
    except Exception as e:
        raise FeatureCacheError(f"--check {model}: not an ONNX file ONNX Runtime can load "
                                f"({str(e).strip().splitlines()[0][:200]})") from None
    if "run_id" not in meta or "input_size" not in meta:
        raise FeatureCacheError(f"--check {model}: no featurecache metadata (run_id, input_size); "
                                "it was not written by `featurecache export`")
    return meta


def check(model: Path, settings: RunSettings, data: str | None = None, data_dir: str | None = None) -> dict:
    """Agreement of the file (plain ONNX Runtime) with `featurecache predict` on the run's test images (of
    `data`, `data_dir` where given instead of the run's own dataset)."""
    from ..data.datasets import DataOptions
    from ..backbones import get_backbone
    from ..encoding.encoder import decode
    from ..extraction.extract import source_item
    from ..settings import input_size

    t0 = time.perf_counter()
    cache_dir, log = settings.cache_dir, settings.say
    meta = _read_meta(model)
    size, method = int(meta["input_size"]), meta.get("resize", "nearest")
    run, pipeline = load_head(cache_dir, meta["run_id"])
    opts = DataOptions(**run.data_options)
    if data:
        opts = replace(opts, data=data, data_dir=data_dir)
    ds = opts.load()
    native = ds.native_size()
    backbone = get_backbone(run.feature_key["model"])
    reads_at = input_size(backbone, run.asked_size, native)  # the run's own size rule
    if reads_at != size:
        seen = f"{native}x{native}" if native else "of mixed sizes"
        raise FeatureCacheError(f"--check {model}: the images of {opts.data} are {seen}, which run {meta['run_id']} "
                                f"reads at {reads_at}x{reads_at}, but the file takes {size}x{size}; check it on "
                                f"images of the run's size (its own data: --data {run.data_options['data']})")
    test = ds.test.images
    # The pixels featurecache itself decodes (JPEG draft scale included where `auto` uses it), so a difference
    # found is the file's, not the decoder's.
    images = np.stack([decode(source_item(test, j), test.name(j), size, method) for j in range(len(test))]) \
        if len(test) else \
        np.zeros((0, size, size, 3), np.uint8)
    _say(log, f"running {model} with ONNX Runtime alone on {len(test)} test images of {opts.data}")
    got = run_file(model, images)
    ref = _predict_rows(run, pipeline, ds, replace(settings, progress=False))
    names = np.array([r["label"] for r in ref])
    agree = int((got["label_name"] == names).sum()) if len(names) else 0
    diff = float(np.abs(got["scores"] - np.stack([r["values"] for r in ref])).max()) if len(ref) else 0.0
    return {"file": str(model), "run_id": meta["run_id"], "data": opts.data, "images": len(ref), "agree": agree,
            "label_agreement": agree / len(ref) if len(ref) else 1.0, "max_score_difference": diff,
            "score_kind": meta.get("score_kind"), "onnxruntime": str(got["onnxruntime_version"]),
            "tensorflow_imported": bool(got["tensorflow_imported"]),
            "sklearn_imported": bool(got["sklearn_imported"]), "seconds": round(time.perf_counter() - t0, 2)}


def _predict_rows(run: Run, pipeline, ds, settings: RunSettings) -> list[dict]:
    """What `featurecache predict` gives on the test images: the run's head on the run's rows of them."""
    from ..heads import scores
    from ..runs.predict import label_rows

    test = ds.test.images
    if not len(test):
        return []
    x = run.rows(test, settings)
    values = scores(pipeline, x.copy()).values  # the normaliser works in place
    rows = label_rows(test.ids, pipeline, x, list(run.class_names), top=1)
    return [{"label": r["label"], "values": v.astype(np.float32)} for r, v in zip(rows, values)]


def describe_check(r: dict) -> str:
    pct = 100.0 * r["label_agreement"]
    verdict = "agree" if r["agree"] == r["images"] else "DISAGREE"
    return (f"{r['file']}: labels {verdict} with `featurecache predict` on {r['agree']}/{r['images']} test images of "
            f"{r['data']} ({pct:.2f}%); largest score difference {r['max_score_difference']:.3g} "
            f"({r['score_kind']}); ONNX Runtime {r['onnxruntime']} in a process that "
            f"{'DID' if r['tensorflow_imported'] else 'did not'} import TensorFlow; {r['seconds']:.1f} s")
