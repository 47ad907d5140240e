"""The shared core that every stage imports.

Nothing in here imports a stage, DVC or the Azure SDK: `chat`, `pii` and `generate` are also
shipped as the endpoint's code folder next to `serve/score.py`, so keep their imports light.
"""
