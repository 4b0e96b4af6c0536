"""Images become vectors here and nowhere else: decode and resize (images), the taps a backbone offers
(taps), pooling and preprocessing rules with their numpy and ONNX forms, and the Encoder that runs them
on an engine."""
