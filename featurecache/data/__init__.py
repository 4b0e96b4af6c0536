"""Datasets in: the sources people have (folders, arrays, built-ins), each image named by its content hash
(datasets), the seeded stratified split (sampling) and augmented views of images (augment)."""
