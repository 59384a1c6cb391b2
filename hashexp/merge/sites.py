"""Merge sites: one width shared by several tensors, and which sites a model has.

The site types live in :mod:`hashexp.merge.site` (re-exported here); this module adds
:func:`model_sites`, the one way every caller asks a model for its sites (declared by the model,
or found by tracing, :mod:`hashexp.merge.discovery`), and the models' mixin.
"""

from __future__ import annotations

from torch import nn

from hashexp.merge.site import (ACTIVATIONS, POSITIVELY_HOMOGENEOUS, Consumer, Member, MergeSite,  # noqa: F401
                                Producer, Span, consumer_output, in_width, norm_affine, out_width, site_input,
                                span_width)


def model_sites(model: nn.Module) -> list[MergeSite]:
    """The merge sites of ``model``: ``model.merge_sites()`` if it declares them, else the traced ones.

    Tracing (:func:`hashexp.merge.discovery.find_sites`) needs an example input: the one
    remembered by ``find_sites``/``attach_example``, or random inputs of ``model.input_shape``.
    The result is cached on the model and stays valid after merges (offsets follow live widths).
    """
    declared = getattr(model, "merge_sites", None)
    if callable(declared):
        return declared()
    from hashexp.merge.discovery import discovered_sites

    return discovered_sites(model)


class HasMergeSites:
    """Mixin for models: ``merge_sites()`` (traced unless a model overrides it) and ``widths()``.

    The sites are found by tracing the model on random inputs of its ``input_shape``
    (:mod:`hashexp.merge.discovery`), named by ``site_names()`` if the model has it. A model may
    still declare its sites by hand by overriding ``merge_sites()``. A model rebuilt from
    ``widths()`` must have the same parameter shapes as the merged one, so that model.pt can be
    loaded into a freshly built model.
    """

    def merge_sites(self) -> list[MergeSite]:
        """The model's merge sites in forward order (traced once, cached on the model)."""
        from hashexp.merge.discovery import discovered_sites

        return discovered_sites(self)

    def widths(self) -> dict[str, int]:
        """``{site name: width}`` of the model's sites."""
        return {s.name: s.width for s in model_sites(self)}


def model_widths(model: nn.Module, sites: list[MergeSite] | None = None) -> dict[str, int]:
    """``{site name: width}`` of ``model`` (of ``sites`` when given, e.g. a cached list)."""
    return {s.name: s.width for s in (model_sites(model) if sites is None else sites)}
