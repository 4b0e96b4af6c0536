"""Keep native libraries' own logging (TensorFlow, absl, oneDNN, CUDA, gRPC) away from users.

TensorFlow 2.21 writes its start-up lines ("oneDNN custom operations are on", "Could not find cuda
drivers", "E0000 ... failed call to cuInit") from C++ straight to file descriptor 2, some before absl
logging is initialised, so `TF_CPP_MIN_LOG_LEVEL` does not reach all of them. The only place that sees
every such line is the descriptor itself: `install()` routes fd 2 through a pipe and drops the lines
written in those libraries' log formats. Python's own `sys.stderr` (our notices and errors, progress
bars, tracebacks) is pointed at a copy of the original descriptor, so it bypasses the filter entirely
and keeps its order and timing. `--verbose` or FEATURECACHE_DEBUG=1 leaves everything as it was.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import warnings

# Log formats of the native libraries, not messages: a new TensorFlow line in a known format is
# dropped without listing it here.
NATIVE_LOG = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.\-/]+:\d+\]"           # absl / glog (TF >= 2.16, XLA)
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] [\w.\-/]+:\d+\]"       # TensorFlow's older logger
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|To enable the following instructions: .*rebuild TensorFlow"
    rb"|oneDNN custom operations are on"
    rb"|(?:WARNING|INFO):absl:"                                             # absl's Python logger
    rb"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEFD] \d+ \d+\] [\w.\-/]+:\d+:"    # Ray's core (--executor ray)
    rb")")
# Environment read by the libraries at import time: quiet what can be quieted at the source.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR", "GLOG_minloglevel": "2"}

_state: dict = {}


def debug_requested() -> bool:
    return os.environ.get("FEATURECACHE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def install() -> None:
    """Filter native log lines out of fd 2 for the rest of this process (idempotent)."""
    if _state or debug_requested():
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # Python-level warnings that TensorFlow and Keras raise on import or model build are theirs, not ours.
    for module in ("tensorflow", "keras", "absl", "google.protobuf", "h5py", "onnxruntime", "openvino", "nncf"):
        warnings.filterwarnings("ignore", module=module + r"(\..*)?$")
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:  # no usable fd 2 (a closed stderr): nothing to filter
        return
    sys.stderr = os.fdopen(os.dup(original), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                           errors="backslashreplace")
    thread = threading.Thread(target=_pump, args=(read_end, original), name="featurecache-stderr", daemon=True)
    _state.update(original=original, thread=thread)
    thread.start()
    atexit.register(uninstall)


def _pump(read_end: int, original: int) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            kept = b"".join(line + b"\n" for line in lines if not NATIVE_LOG.match(line))
            if kept:
                os.write(original, kept)
    if pending and not NATIVE_LOG.match(pending):
        os.write(original, pending)


def uninstall() -> None:
    """Put fd 2 back and let the pump forward what is still in the pipe."""
    if not _state.get("original"):
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(_state["original"], 2)  # closes our write end; the pump sees EOF unless a child still holds one
    _state["thread"].join(timeout=1.0)
    _state["original"] = None
