"""Datasets, protocol splits and host-side batching.

- `sources`: `load_source(name)` -> `ImageSource` (labels in memory, images by
  global index) for Fashion-MNIST, CIFAR-10, NUS-WIDE and MIRFlickr-25K.
- `nus_wide`, `mirflickr25k`: tfds builders over manually downloaded files.
- `idx_files`, `manual_files`: readers of the raw files those use.
- `splits`: the "ssdh" / "modern" protocol splits, saved and checked.
- `pipeline`: per-epoch order, per-process training batches, padded eval batches.

Submodules are imported explicitly; this package imports nothing, so that using
`splits` or `pipeline` does not import TensorFlow.
"""
