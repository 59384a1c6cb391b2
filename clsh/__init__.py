"""clsh: multi-table LSH bucket index in C++ (threads, GIL released), with a Cython binding.

Each item is a row of L integer codes, one per hash table (e.g. K packed SimHash sign
bits per table, Charikar 2002). Items sharing a code in a table share a bucket; items
sharing a bucket in at least one (or ``min_tables``) of the L tables are candidate
near-duplicates (Indyk & Motwani 1998, the multi-table amplification). clsh takes numpy
buffers and knows nothing of torch: fingerprints come from :mod:`hashexp.lsh`, whose CPU
sign-and-pack step is :func:`pack_signs` here.

    >>> import numpy as np, clsh
    >>> t = clsh.LSHTables(n_tables=2)
    >>> t.build(np.array([[1, 7], [1, 8], [2, 8]], dtype=np.uint64))
    >>> t.candidate_pairs().tolist()
    [[0, 1], [1, 2]]
    >>> clsh.union_groups(3, np.array([[0, 1], [1, 2]]), np.array([0.9, 0.5]), max_group_size=2).tolist()
    [0, 0, 1]
"""

from clsh._clsh import LSHTables, pack_signs, union_groups

__all__ = ["LSHTables", "union_groups", "pack_signs"]
