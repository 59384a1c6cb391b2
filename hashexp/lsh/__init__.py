"""Fingerprints for LSH: SimHash (Charikar 2002), the simple-LSH MIPS transform (Neyshabur &
Srebro 2015), bit packing, and a CuPy kernel for the GPU. The tables themselves are
:mod:`clsh` (C++), re-exported here as ``LSHTables`` and ``union_groups``.

    >>> import torch
    >>> from hashexp.lsh import SimHash, LSHTables
    >>> h = SimHash(dim=16, bits=8, tables=4, seed=0)
    >>> x = torch.randn(100, 16)
    >>> t = LSHTables(h.tables)
    >>> t.build(h.fingerprint(torch.cat([x, 2 * x])))   # x and 2x point the same way
    >>> bool((t.candidate_pairs(min_tables=4) == [[0, 100]]).all(1).any())
    True
"""

from hashexp.lsh.mips import mips_query_transform, mips_transform
from hashexp.lsh.simhash import SimHash, pack_bits

__all__ = ["SimHash", "pack_bits", "mips_transform", "mips_query_transform", "LSHTables", "union_groups"]


def __getattr__(name):
    # clsh is a compiled extension: import it on first use so that fingerprinting works
    # (and this package imports) even where the extension is not built yet.
    if name in ("LSHTables", "union_groups"):
        import clsh

        return getattr(clsh, name)
    raise AttributeError(f"module 'hashexp.lsh' has no attribute {name!r}")
