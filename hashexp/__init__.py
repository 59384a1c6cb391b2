"""hashexp: hashed neural networks that compress themselves while they train.

Locality-sensitive hashing groups neurons whose weights point the same way; each group is
merged into one activation-weighted representative and the next layer absorbs the merge.
See README.md for the commands and docs/DESIGN.md for the architecture.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy public names, so ``import hashexp`` stays light (no exporter imported until used)."""
    if name == "export_model":
        from hashexp.export import export_model

        return export_model
    raise AttributeError(f"module 'hashexp' has no attribute {name!r}")
