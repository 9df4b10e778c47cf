"""The benchmark behind BENCHMARKS.md, one module per job (``python -m tools.benchmark`` runs it).

settings (what to run), experiment (the online cache on the stream), latency (the timing harness),
imagenet (MobileNetV2 at 224 px), backbones (full mode's trained backbones), run (one backbone end
to end), results (the typed records written as JSON), stats, plots and report (BENCHMARKS.md).
"""
