"""hashexp: hashed neural networks that compress themselves while they train.

Locality-sensitive hashing groups neurons whose weights point the same way; each group is
merged into one activation-weighted representative and the next layer absorbs the merge.
See README.md for the commands and docs/DESIGN.md for the architecture.

Python API (imported on first use, so ``import hashexp`` stays light)::

    from hashexp import compress_model, find_sites
    print(find_sites(model, x[:2]))                # the merge sites tracing finds, and what it refuses
    small, report = compress_model(model, x, keep=0.5)
"""

__version__ = "0.1.0"
__all__ = ["compress_model", "export_model", "find_sites"]


def __getattr__(name: str):
    """Lazy public names, so ``import hashexp`` stays light (nothing heavy imported until used)."""
    if name == "compress_model":
        from hashexp.compress import compress_model

        return compress_model
    if name == "find_sites":
        from hashexp.merge.discovery import find_sites

        return find_sites
    if name == "export_model":
        from hashexp.export import export_model

        return export_model
    raise AttributeError(f"module 'hashexp' has no attribute {name!r}")
