"""`featurecache export`: a run as one ONNX file (exporter), its graph glue (graph: preprocessing, pooling,
the scikit-learn head through skl2onnx) and the plain runtime that checks it (runtime)."""
