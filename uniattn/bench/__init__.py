"""Benchmarks: ``python -m uniattn.bench SUBCOMMAND [--backend NAME ...] [--quick] [--full]
[--out DIR]``.

Every figure is measured on this machine, side by side in one run: times are medians of
interleaved repetitions in one process; memory is peak RSS above the inputs in a fresh
process per backend (see :mod:`uniattn._measure`). Each subcommand prints a markdown
table; with ``--out`` it also writes ``DIR/<name>.md``, the raw figures in
``DIR/<name>.json`` and, where matplotlib is installed (the ``bench`` extra), plots in
``DIR/<name>.png``. A progress bar goes to stderr.

Subcommands (each module's docstring gives its settings):

- ``memory``: the paper's Tables 2 and 3, inference and differentiation, n 2^8 … 2^16.
- ``speed``: uniattn against plain attention and peers, n 1024 … 16384.
- ``scale``: forward+backward at n 131072 on every backend.
- ``tune``: the chunk-size sweep behind the default chunk sizes.
- ``masks``: what skipping fully masked chunks saves; decoding.
- ``backward``: the custom backward against differentiating the forward.
- ``models``: a training step of a small Llama in transformers: eager, sdpa, uniattn.
- ``all``: memory, speed, scale, masks, backward and models, in that order.

Importing this package imports no framework.
"""
