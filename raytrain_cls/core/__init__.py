"""The Ray-free core: config, model, optimizer, loss, distillation, the train/eval engine, checkpoint state, storage.

Everything here runs in a plain Python process (unit tests, `eval`, `export`) and imports neither Ray nor the
layers above it (data, run, commands, bench); tests/unit/test_layers.py enforces both.
"""
