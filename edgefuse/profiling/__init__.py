"""Building blocks of the profile stage (:mod:`edgefuse.profile` is the entry point).

- :mod:`~edgefuse.profiling.results`: the frozen result dataclasses;
- :mod:`~edgefuse.profiling.graphs`: finding graphs, reading their inputs, making the feeds;
- :mod:`~edgefuse.profiling.stats`: latency statistics, interleaved ratios, output parity;
- :mod:`~edgefuse.profiling.targets`: running the runner locally or in the arm64 sandbox
  (:mod:`edgefuse.remote` adds ssh).
"""
