"""Code and field mapping between members' local catalogues and shared code systems.

Mappings are data (``mappings/<site>/``, see ``mappings/README.md``):

* ``codes/*.csv`` -> FHIR R4 ConceptMaps (:mod:`bridge.mapping.conceptmap`): :func:`load_site`,
  :class:`Translator` (the hot-path index), :func:`map_coding` (local -> wire; the local code is
  never dropped), :func:`to_local` (wire -> this site's local code), ``$translate``;
* gaps (:mod:`bridge.mapping.gaps`): :func:`record_gap` counts an unmapped code in the node's
  ``mapping_gap`` table, :func:`find_gaps` lists them for ``hutong mapping check``;
* the packet mark (:mod:`bridge.mapping.marker`): :func:`mark_unmapped`;
* ``fields/*.csv`` (:mod:`bridge.mapping.fields`): vendor columns <-> neutral slip fields.
"""

from bridge.mapping.conceptmap import (
    Coding,
    SiteMaps,
    Translator,
    load_site,
    map_coding,
    map_concept,
    to_local,
    translate,
    translate_many,
)
from bridge.mapping.fields import FieldMap, FieldMapError, apply, load_field_map, unapply
from bridge.mapping.gaps import (
    Gap,
    Observed,
    find_gaps,
    note_unmapped,
    observed_gaps,
    record_gap,
)
from bridge.mapping.marker import (
    FLAGS_SYSTEM,
    UNMAPPED_CODE,
    is_marked,
    mark_unmapped,
    marked_resources,
)
from bridge.mapping.sites import load_node_maps, site_folders

__all__ = [
    "FLAGS_SYSTEM",
    "UNMAPPED_CODE",
    "Coding",
    "FieldMap",
    "FieldMapError",
    "Gap",
    "Observed",
    "SiteMaps",
    "Translator",
    "apply",
    "find_gaps",
    "is_marked",
    "load_field_map",
    "load_node_maps",
    "load_site",
    "map_coding",
    "map_concept",
    "mark_unmapped",
    "marked_resources",
    "note_unmapped",
    "observed_gaps",
    "record_gap",
    "site_folders",
    "to_local",
    "translate",
    "translate_many",
    "unapply",
]
