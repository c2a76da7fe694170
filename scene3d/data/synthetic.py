"""Old home of :mod:`data_prep.synthetic` (the synthetic benchmark is written by data_prep)."""


def __getattr__(name: str):
    # Old names, still imported by scene3d/demo.py; delete once it imports data_prep.synthetic.
    # In-function so the scene3d package itself never imports data_prep.
    if name in ("SyntheticData", "prepare_synthetic"):
        import data_prep.synthetic

        return getattr(data_prep.synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
