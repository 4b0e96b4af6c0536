"""Runs: a head fitted on one feature set, evaluated, saved with its provenance, and loaded again.

    <cache>/runs/<run id>/head.joblib    the fitted scikit-learn pipeline (normaliser, PCA, head)
    <cache>/runs/<run id>/run.json       provenance, metrics and the SHA-256 of head.joblib
    <cache>/runs/<run id>/confusion.png
    <cache>/runs/ledger.jsonl            one line per run, for `featurecache report`

joblib files are pickles, which can run code when loaded: a head is loaded only from the cache's runs
folder, and only when its bytes still hash to what was recorded when it was saved.

A saved run is read back as a `Run` (`load`), the one place that knows run.json's keys and the
fallbacks for records written by earlier versions; everything else reads its typed attributes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import versions
from .compose import Block, rows as compose_rows
from ..errors import FeatureCacheError
from ..settings import FeatureSpec, RunSettings
from ..store.sets import write_atomic


def runs_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "runs"


def new_run_id(head: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{head}-{secrets.token_hex(2)}"


def evaluate(pipeline, x_train, y_train, x_test, y_test, class_names, pred_test=None, pred_train=None) -> dict:
    """`pred_test`/`pred_train`: predictions made elsewhere (--tta averages views; a streamed fit predicts
    chunk by chunk), used instead of the pipeline's on `x_test`/`x_train`."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    labels = list(range(len(class_names)))
    pred_test = pipeline.predict(x_test) if pred_test is None else pred_test
    pred_train = pipeline.predict(x_train) if pred_train is None else pred_train
    report = classification_report(y_test, pred_test, labels=labels, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    return {
        "train_accuracy": float(accuracy_score(y_train, pred_train)),
        "test_accuracy": float(accuracy_score(y_test, pred_test)),
        "per_class": {c: {k: round(float(report[c][k]), 4) for k in ("precision", "recall", "f1-score", "support")}
                      for c in class_names},
        "confusion_matrix": confusion_matrix(y_test, pred_test, labels=labels).tolist(),
    }


def save_run(cache_dir: Path, run_id: str, pipeline, record: dict) -> Path:
    """Write head, provenance and plot; append to the ledger last, so the ledger never names a half-saved run."""
    import joblib

    from .plots import confusion_png

    folder = runs_dir(cache_dir) / run_id
    folder.mkdir(parents=True, exist_ok=False)
    head_path = folder / "head.joblib"
    joblib.dump(pipeline, head_path)
    record = dict(record, run_id=run_id, head_sha256=_sha256(head_path),
                  libraries=versions.library_versions("scikit-learn", "numpy", "joblib", "tensorflow", "keras"),
                  created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    cm = np.asarray(record["metrics"]["confusion_matrix"])
    title = f"{record['head']} on {record['features']} — test accuracy {record['metrics']['test_accuracy']:.4f}"
    confusion_png(cm, record["class_names"], folder / "confusion.png", title)
    record["confusion_png"] = str(folder / "confusion.png")
    write_atomic(folder / "run.json", json.dumps(record, indent=1))
    ledger = runs_dir(cache_dir) / "ledger.jsonl"
    summary = {k: record[k] for k in ("run_id", "created", "data", "features", "head", "library", "notes",
                                      "fit_seconds", "dims", "n_train", "n_test")}
    summary.update(train_accuracy=record["metrics"]["train_accuracy"],
                   test_accuracy=record["metrics"]["test_accuracy"])
    with open(ledger, "a") as f:
        f.write(json.dumps(summary) + "\n")
    return folder


def load_record(cache_dir: Path, run_id: str) -> dict:
    """run.json as saved (`load` gives the typed Run)."""
    path = runs_dir(cache_dir) / run_id / "run.json"
    if not path.is_file():
        known = sorted(p.parent.name for p in runs_dir(cache_dir).glob("*/run.json"))  # run ids, by time
        hint = f"; the latest is {known[-1]}" if known else "; fit one with `featurecache fit`"
        raise FeatureCacheError(f"--run {run_id}: no such run in {runs_dir(cache_dir)}{hint}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise FeatureCacheError(f"{path}: unreadable run record ({e}); fit the head again") from e


def load(cache_dir: Path, run_id: str) -> Run:
    """The saved run `run_id`; its head is unpickled only by `Run.pipeline()`."""
    return Run.from_record(load_record(cache_dir, run_id), runs_dir(cache_dir) / run_id)


def load_head(cache_dir: Path, run_id: str):
    """(Run, pipeline), refusing a head file whose bytes changed since it was saved."""
    run = load(cache_dir, run_id)
    return run, run.pipeline()


def read_ledger(cache_dir: Path) -> list[dict]:
    path = runs_dir(cache_dir) / "ledger.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash; the run folder still holds the full record
    return out


def ledger_runs(cache_dir: Path) -> list[Run]:
    """The ledger's runs in order, each from its full record where its folder is still there (so it can
    describe every setting), else from its ledger line alone."""
    out = []
    for line in read_ledger(cache_dir):
        folder = runs_dir(cache_dir) / str(line.get("run_id", ""))
        try:
            out.append(load(cache_dir, folder.name) if (folder / "run.json").is_file()
                       else Run.from_record(line, folder))
        except FeatureCacheError:
            out.append(Run.from_record(line, folder))
    return out


def spec_dict(spec) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}


@dataclass(frozen=True)
class Run:
    """A saved run, typed: what fit recorded in run.json (`from_record` reads every version of it)."""
    id: str
    dir: Path
    data: str = ""  # the dataset's name
    data_options: dict = field(default_factory=dict)  # datasets.DataOptions, as given to fit
    class_names: tuple[str, ...] = ()
    spec: FeatureSpec | None = None  # the feature options, with the size and taps the run used pinned
    asked_size: int | None = None  # --size as fit was given it (None: the size rule chose spec.size)
    precision: str = "float32"
    blocks: tuple[Block, ...] = ()  # how a row is made from stored vectors (compose.Block), in order
    feature_set: str = ""  # the first block's set
    feature_key: dict = field(default_factory=dict)  # the first block's set's key
    features: str = ""  # as recorded at fit time: model/taps/pooling size
    dims: int = 0
    head: str = ""
    head_options: dict = field(default_factory=dict)
    head_params: dict = field(default_factory=dict)  # the fitted pipeline's head__ parameters, repr'd
    library: str = ""
    normalize: str | None = None
    pca: int | None = None
    grid: tuple[dict, ...] = ()  # --grid: every setting tried, {"params", "mean", "std"}
    augment: tuple[str, ...] = ()  # views whose rows were added to the training rows
    tta: bool = False  # test scores averaged over the image and its `augment` views
    metrics: dict = field(default_factory=dict)
    n_train: int = 0  # training rows the head was fitted on (images times views)
    n_test: int = 0
    n_train_images: int = 0
    fit_seconds: float = 0.0
    notes: str = ""
    created: str = ""
    streamed: dict | None = None  # a fit streamed from the stored parts: its epochs and memory
    run_settings: dict = field(default_factory=dict)  # how the fit ran (engine, batch size, ...): not what it made
    head_sha256: str = ""

    @classmethod
    def from_record(cls, r: dict, folder: Path) -> Run:
        """A run from its run.json, or from its ledger line alone (the run's folder removed). Runs saved
        before fit-time composition have no `blocks` and one `layer`; ledger lines carry the accuracies at
        the top level; older records lack the spec's later fields, which take their defaults."""
        layers = tuple(r.get("layers") or ([r["layer"]] if r.get("layer") else ()))
        raw = dict(r.get("spec") or {})
        spec = None
        if raw or r.get("model"):
            known = {f.name for f in dataclasses.fields(FeatureSpec)}
            raw.setdefault("model", r.get("model"))
            raw.setdefault("weights", r.get("weights", "imagenet"))
            spec = FeatureSpec(**{k: (tuple(v) if isinstance(v, list) else v)
                                  for k, v in dict(raw, size=r.get("size", raw.get("size")), layers=layers).items()
                                  if k in known})
        if r.get("blocks"):
            blocks = tuple(Block.from_dict(b) for b in r["blocks"])
        elif layers and spec is not None:  # one tap, read as stored
            blocks = (Block(layers[0], spec.pool, spec.pool, r.get("feature_set", ""), (), int(r.get("dims", 0))),)
        else:
            blocks = ()
        metrics = r.get("metrics") or {k: r[k] for k in ("train_accuracy", "test_accuracy") if k in r}
        n_train = int(r.get("n_train", 0))
        return cls(
            id=r.get("run_id") or Path(folder).name, dir=Path(folder), data=r.get("data", ""),
            data_options=dict(r.get("data_options") or {}), class_names=tuple(r.get("class_names") or ()),
            spec=spec, asked_size=raw.get("size"), precision=str(raw.get("precision") or "float32"), blocks=blocks,
            feature_set=r.get("feature_set", blocks[0].set_id if blocks else ""),
            feature_key=dict(r.get("feature_key") or {}), features=r.get("features", ""), dims=int(r.get("dims") or 0),
            head=r.get("head", ""), head_options=dict(r.get("head_options") or {}),
            head_params=dict(r.get("head_params") or {}), library=r.get("library", ""),
            normalize=r.get("normalize"), pca=r.get("pca"), grid=tuple(r.get("grid") or ()),
            augment=tuple(r.get("augment") or ()), tta=bool(r.get("tta")), metrics=metrics, n_train=n_train,
            n_test=int(r.get("n_test", 0)), n_train_images=int(r.get("n_train_images", n_train)),
            fit_seconds=float(r.get("fit_seconds", 0.0)), notes=r.get("notes") or "", created=r.get("created", ""),
            streamed=r.get("streamed"), run_settings=dict(r.get("run_settings") or {}),
            head_sha256=r.get("head_sha256", ""))

    # ---- what the run is -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return [b.layer for b in self.blocks]

    @property
    def size(self) -> int | None:
        return self.spec.size if self.spec is not None else None

    @property
    def views(self) -> list[str]:
        """The views its test images are scored on: the images, and their augmented views with --tta."""
        return ["", *self.augment] if self.tta else [""]

    def chosen_params(self) -> dict:
        """The head options the fit ended with: as given, and --grid's best setting over them."""
        best = max(self.grid, key=lambda g: g["mean"])["params"] if self.grid else {}
        return {**self.head_options, **best}

    def describe(self) -> str:
        """One line naming every setting that makes two runs differ, e.g. `vgg16/block3_pool+block4_pool/
        max2x2 64px bf16 +hflip tta + linsvc C=0.1 l2; 800 train rows of photos` (weights other than
        imagenet and precisions other than float32 are named; the rest always)."""
        feats = [self.features or "?"]
        if self.spec is not None and self.spec.weights != "imagenet":
            feats.append(f"{self.spec.weights} weights" + (f" (seed {self.spec.seed})" if self.spec.seed else ""))
        if self.precision != "float32":
            feats.append(self.precision)
        feats += [f"+{v}" for v in self.augment] + (["tta"] if self.tta else [])
        head = [self.head] + [f"{k}={v}" for k, v in sorted(self.chosen_params().items()) if k != "random_state"]
        head += (["grid"] if self.grid else []) + ([self.normalize] if self.normalize else [])
        head += [f"pca {self.pca}"] if self.pca else []
        rows = f"; {self.n_train} train rows" + (f" of {self.data}" if self.data else "") if self.n_train else ""
        return f"{' '.join(feats)} + {' '.join(head)}{rows}"

    # ---- using it ------------------------------------------------------------------------------------
    def pipeline(self):
        """The fitted head, refusing a head file whose bytes changed since it was saved."""
        import joblib

        head_path = self.dir / "head.joblib"
        if not head_path.is_file() or _sha256(head_path) != self.head_sha256:
            raise FeatureCacheError(f"{head_path}: missing or changed since it was saved (hash mismatch); "
                                    "refusing to unpickle it, fit the head again")
        return joblib.load(head_path)

    def stored_specs(self, view: str = "") -> dict[str, FeatureSpec]:
        """Stored pooling -> the spec that extracts (or finds) the run's taps stored that way (of a view)."""
        return {pool: replace(self.spec, pool=pool, layers=tuple(b.layer for b in self.blocks if b.stored == pool),
                              view=view)
                for pool in dict.fromkeys(b.stored for b in self.blocks)}

    def compose(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        """The run's rows from each tap's vectors as stored ({layer: (n, stored dims)})."""
        return compose_rows(list(self.blocks), stored)

    def rows(self, images, settings: RunSettings, view: str = "") -> np.ndarray:
        """The run's rows of an image source (of its `view`): images the cache lacks are encoded by
        `extract` and stored, so asking again (or serving them) is a cache hit."""
        from ..extraction.extract import run_extract
        from ..store.sets import FeatureStore

        stored, store = {}, FeatureStore(settings.cache_dir)
        for spec in self.stored_specs(view).values():  # each tap as stored, then the run's blocks of them
            res, _ = run_extract([images], spec, settings)
            stored.update({layer: store.get(res.set_ids[layer]).gather(images.ids) for layer in spec.layers})
        return self.compose(stored)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
