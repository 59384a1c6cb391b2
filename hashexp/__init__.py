"""hashexp: hashed neural networks that compress themselves while they train.

Locality-sensitive hashing groups neurons whose weights point the same way; each group is
merged into one activation-weighted representative and the next layer absorbs the merge.
See README.md for the commands and docs/DESIGN.md for the architecture.
"""

__version__ = "0.1.0"
