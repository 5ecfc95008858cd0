"""Corpus preparation: what turns a corpus on disk, or a download, into Kaldi-style lists, once.

Here: the ``prepare`` command (``python -m svlib.corpora.prepare``), one module per corpus family (``manifest``:
sv-bench/sv-mini, ``voxceleb``, ``cnceleb``, ``noise``: MUSAN/RIRs, ``demo_data``: the demo's speechocean762,
ESC-10 and simulated RIRs), their shared helpers (``common``), the downloader and the public-corpora rebuild.
Not here: what training reads (the lists, sampling, augmentation, channel code: ``svlib.data``, which never
imports this package).
"""
