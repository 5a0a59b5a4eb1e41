"""The tiny world's builders: the recipes that pretrain the built-in `tiny:` bases.

Tooling beside the library (issue #18): a user's run needs only the built bases, which ship
inside the package (`pipeline/bases/shipped/`) and load through the same `from_pretrained` calls
as an HF id. These modules build them — on a cache miss, by `lol bases build`, or in tests —
and register themselves with the library through the `lol.tiny_bases` entry points
(pyproject.toml); the library never imports this package by name.

Each module declares `NAME`, `KIND`, `SIZES`, `recipe_config(size)`, `data_fingerprint()`,
`build(config, out_dir, progress)` and `load(path, …)`; see `pipeline.bases.TinyBase`.
"""
