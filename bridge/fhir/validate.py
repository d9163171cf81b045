"""Fast structural validation of FHIR R4 JSON against the official R4 JSON Schema.

The schema (``schema/fhir.schema.json``, see ``schema/PROVENANCE.md``) is compiled with
``jsonschema-rs`` lazily, once per process, on first use; nothing happens at import time.

Embedded resources. The schema reaches every embedded resource (``Bundle.entry.resource``,
``contained``, ``Bundle.entry.response.outcome``, ``Parameters.parameter.resource``) through
``ResourceList``, a 146-way ``oneOf``. When that fails, jsonschema-rs can only say "not valid
under any of the given schemas" at the Bundle, quoting the whole Bundle. So ``ResourceList`` is
replaced by ``{"type": "object"}`` and this module visits those four places itself. Each embedded
resource is checked by a validator compiled for ``{"$ref": "#/definitions/<resourceType>"}``, one
per type, compiled on first use (about 30 ms each) and cached. A missing or unknown
``resourceType`` is an error. The verdict is the same as the full schema's (a test checks this).
Problems name the resource they are in, e.g.
``entry[3].resource(Observation).status: not one of the allowed codes [...]``.

No values. A problem names the path and the rule, never the offending value: the text goes to
the caller, quarantine reasons, the audit trail and logs, and the value may be patient data (a
name typed into a code field). IT sees the value in the quarantined raw bytes. Only what comes
from the schema (allowed codes, limits, format names, resource type names) and property names
appear.

Speed. For a 22-resource lab Bundle, the validity check takes about 170 µs on the development VM,
close to the cost of the per-type ``is_valid`` calls themselves. Measured on jsonschema-rs 0.60,
``is_valid`` through the root ``oneOf`` is no slower; the dispatch exists for the error paths.
Parsing the same 28 kB with orjson takes about 200 µs, so parsing is the larger half of
:func:`parse_and_validate_bundle`. Problems are only worked out, with ``iter_errors``, once
``is_valid`` has said no.

Fixes applied at load time, in :func:`_patch` (the copied file is kept byte-for-byte as published):

1. ``fhirVersion``: the 4.0.0 build's enums lack ``"4.0.1"`` (the R4 technical correction, which
   R4 systems actually send); it is appended to every such enum.
2. ``string``/``markdown``: the pattern ``^[ \\r\\n\\t\\S]+$`` comes from XML Schema, where ``\\s``
   means only space, tab, CR and LF, so the class matches every character. Regex engines read
   ``\\S`` as "not Unicode whitespace", which wrongly rejects text containing U+3000 IDEOGRAPHIC
   SPACE (common in Chinese names and addresses), U+00A0 or U+202F. It is replaced by
   ``minLength: 1`` (any non-empty string), which is what the FHIR specification means and is
   cheaper than a regex on every string. ``fhir.resources`` accepts such text too.
3. Complex types and resources: the 659 definitions with ``properties`` have no ``"type"``, so
   ``"code": "x"`` (a string where a CodeableConcept belongs) or ``"entry": [5]`` passed.
   ``"type": "object"`` is added to each (and ``null`` stays allowed in ``_given``-style arrays,
   where FHIR JSON uses it to keep primitive extensions aligned); ``xhtml`` (Narrative.div) gets
   ``"type": "string"``.
4. ``integer``/``positiveInt``/``unsignedInt``: declared ``"type": "number"`` with a regex, but a
   regex never applies to numbers, so ``1.5`` or ``-3`` passed. They become ``"type": "integer"``
   with ``minimum`` 1 / 0 for positiveInt / unsignedInt.

API: :func:`parse_and_validate_bundle` (bytes in, dict out, :class:`InvalidFhir` on any problem),
:func:`validate_bundle` and :func:`validate_resource` for parsed data, and :func:`errors` to list
every problem (for quarantine details and tests).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

from bridge.errors import InvalidFhir

SCHEMA_PATH = Path(__file__).with_name("schema") / "fhir.schema.json"
#: codes of required bindings the schema leaves open (generated: ``bindings_gen.py``)
BINDINGS_PATH = Path(__file__).with_name("bindings.json")

#: FHIR versions appended to the schema's ``fhirVersion`` enums at load time (fix 1)
EXTRA_FHIR_VERSIONS = ("4.0.1",)
#: the published string/markdown pattern (fix 2)
_XSD_STRING_PATTERN = "^[ \\r\\n\\t\\S]+$"
#: published integer patterns -> what replaces them (fix 4)
_INTEGER_PATTERNS: dict[str, dict[str, Any]] = {
    "^-?([0]|([1-9][0-9]*))$": {"type": "integer"},
    "^[1-9][0-9]*$": {"type": "integer", "minimum": 1},
    "^[0]|([1-9][0-9]*)$": {"type": "integer", "minimum": 0},
}

#: at most this many problems go into an InvalidFhir message (``detail`` has them all)
MESSAGE_PROBLEMS = 3
#: a property name or allowed value quoted in a problem is cut to this many characters
MAX_VALUE_CHARS = 40
#: a problem longer than this (a path through hundreds of nested resources) is cut in the middle
MAX_PROBLEM_CHARS = 400
#: allowed values listed in an enum problem before "..."
MAX_OPTIONS = 8

_lock = threading.RLock()
_state: _Schema | None = None


class _Schema:
    """The loaded, patched schema plus one compiled validator per resource type."""

    def __init__(self) -> None:
        doc = orjson.loads(SCHEMA_PATH.read_bytes())
        _patch(doc)
        defs: dict[str, Any] = doc["definitions"]
        self.types: frozenset[str] = frozenset(doc["discriminator"]["mapping"])
        #: primitive type name(s) by pattern, to name the format in problems ("uri/url/...")
        self.formats: dict[str, str] = {}
        for name, d in sorted(defs.items()):
            if name[:1].islower() and isinstance(d.get("pattern"), str):
                known = self.formats.get(d["pattern"])
                self.formats[d["pattern"]] = f"{known}/{name}" if known else name
        # embedded resources are dispatched by _is_valid()/_collect(), not the 146-way oneOf
        defs["ResourceList"] = {"type": "object"}
        self._base = {"$schema": doc["$schema"], "definitions": defs}
        #: compiled validators by resource type, filled on first use of each type
        self.validators: dict[str, jsonschema_rs.Validator] = {}
        #: required bindings the schema leaves open (``bindings.json``): type -> [(path, codes)]
        table = orjson.loads(BINDINGS_PATH.read_bytes())["bindings"]
        self.bindings: dict[str, list[tuple[tuple[str, ...], frozenset[str], list[str]]]] = {
            t: [
                (tuple(path.split(".")), frozenset(codes), codes)
                for path, codes in sorted(paths.items())
            ]
            for t, paths in table.items()
        }

    def validator(self, resource_type: str) -> jsonschema_rs.Validator:
        v = self.validators.get(resource_type)
        if v is None:
            with _lock:
                v = self.validators.get(resource_type)
                if v is None:
                    schema = dict(self._base)
                    schema["$ref"] = f"#/definitions/{resource_type}"
                    v = jsonschema_rs.validator_for(schema)
                    self.validators[resource_type] = v
        return v


def _patch(doc: dict[str, Any]) -> None:
    """Apply the load-time fixes listed in the module docstring, in place."""
    defs: dict[str, Any] = doc["definitions"]
    for definition in defs.values():
        if "properties" in definition and "type" not in definition:
            definition["type"] = "object"  # fix 3
        for name, prop in definition.get("properties", {}).items():
            # fix 3: "_given": [null, {...}] keeps primitive-extension arrays aligned (FHIR JSON)
            if name[:1] == "_" and prop.get("type") == "array":
                prop["items"] = {"anyOf": [{"type": "null"}, prop["items"]]}
    defs["xhtml"]["type"] = "string"  # fix 3
    _patch_node(doc)


def _patch_node(node: Any) -> None:
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if pattern == _XSD_STRING_PATTERN:  # fix 2
            del node["pattern"]
            node["minLength"] = 1
        elif (
            isinstance(pattern, str)
            and pattern in _INTEGER_PATTERNS
            and node.get("type") == "number"
        ):  # fix 4
            del node["pattern"]
            node.update(_INTEGER_PATTERNS[pattern])
        for key, value in node.items():
            if key == "fhirVersion" and isinstance(value, dict):  # fix 1
                target = value.get("items", value)
                enum = target.get("enum") if isinstance(target, dict) else None
                if isinstance(enum, list):
                    enum.extend(v for v in EXTRA_FHIR_VERSIONS if v not in enum)
            _patch_node(value)
    elif isinstance(node, list):
        for value in node:
            _patch_node(value)


def _schema() -> _Schema:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _Schema()
    return _state


def resource_types() -> frozenset[str]:
    """Every resource type the R4 schema defines."""
    return _schema().types


# ---------------------------------------------------------------------------------------------
# walking embedded resources


def _embedded(obj: dict[str, Any], rtype: str) -> Iterable[tuple[str, Any]]:
    """(relative path, value) of every place this resource holds another resource."""
    contained = obj.get("contained")
    if isinstance(contained, list):
        for i, c in enumerate(contained):
            yield f"contained[{i}]", c
    if rtype == "Bundle":
        entries = obj.get("entry")
        if isinstance(entries, list):
            for i, e in enumerate(entries):
                if not isinstance(e, dict):
                    continue
                if "resource" in e:
                    yield f"entry[{i}].resource", e["resource"]
                resp = e.get("response")
                if isinstance(resp, dict) and "outcome" in resp:
                    yield f"entry[{i}].response.outcome", resp["outcome"]
    elif rtype == "Parameters":
        yield from _parameter_resources(obj.get("parameter"), "parameter")


def _parameter_resources(params: Any, path: str) -> Iterable[tuple[str, Any]]:
    if isinstance(params, list):
        for i, p in enumerate(params):
            if isinstance(p, dict):
                if "resource" in p:
                    yield f"{path}[{i}].resource", p["resource"]
                yield from _parameter_resources(p.get("part"), f"{path}[{i}].part")


def _resource_type(obj: Any, path: str, types: frozenset[str]) -> tuple[str | None, str | None]:
    """(resourceType, None) if obj is a resource of a known type, else (None, problem)."""
    where = path or "(root)"
    if not isinstance(obj, dict):
        return None, f"{where}: expected a resource (JSON object), got {_json_type(obj)}"
    if "resourceType" not in obj:
        return None, f"{where}: resourceType is missing"
    rtype = obj["resourceType"]
    if not isinstance(rtype, str):
        return None, f"{_join(path, 'resourceType')}: expected string, got {_json_type(rtype)}"
    if rtype not in types:
        return None, f"{_join(path, 'resourceType')}: unknown resourceType (not an R4 type)"
    return rtype, None


def _is_valid(obj: Any, s: _Schema) -> bool:
    """The hot path: same verdict as _collect() finding nothing, with as little Python as can be.

    Once a resource passes its type's validator, its shape is known (entry is a list of objects,
    entry.resource an object, ...), so the embedded resources can be reached without checks.
    """
    if type(obj) is not dict:
        return False
    rtype = obj.get("resourceType")
    if type(rtype) is not str:
        return False
    v = s.validators.get(rtype)
    if v is None:
        if rtype not in s.types:
            return False
        v = s.validator(rtype)
    if not v.is_valid(obj):
        return False
    bound = s.bindings.get(rtype)
    if bound is not None:
        for parts, codes, _ in bound:
            for _, value in _values(obj, parts, ""):
                if value not in codes:
                    return False
    contained = obj.get("contained")
    if contained:
        for c in contained:
            if not _is_valid(c, s):
                return False
    if rtype == "Bundle":
        for e in obj.get("entry") or ():
            r = e.get("resource")
            if r is not None and not _is_valid(r, s):
                return False
            resp = e.get("response")
            if resp is not None and "outcome" in resp and not _is_valid(resp["outcome"], s):
                return False
    elif rtype == "Parameters":
        for _, r in _parameter_resources(obj.get("parameter"), ""):
            if not _is_valid(r, s):
                return False
    return True


def _values(obj: Any, parts: tuple[str, ...], path: str) -> Iterable[tuple[str, str]]:
    """(path, code) of every string at ``parts`` (lists walked at any step); what is not a
    string there is the schema's to refuse."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _values(item, parts, f"{path}[{i}]")
        return
    if not parts:
        if isinstance(obj, str):
            yield path, obj
        return
    if isinstance(obj, dict) and parts[0] in obj:
        yield from _values(obj[parts[0]], parts[1:], _join(path, parts[0]))


def _collect(obj: Any, path: str, s: _Schema, out: list[str], limit: int | None) -> None:
    if limit is not None and len(out) >= limit:
        return
    rtype, problem = _resource_type(obj, path, s.types)
    if rtype is None:
        out.append(_clip(problem))  # type: ignore[arg-type]
        return
    label = f"{path}({rtype})" if path else ""
    for err in s.validator(rtype).iter_errors(obj):
        out.append(_clip(_format(err, label)))
        if limit is not None and len(out) >= limit:
            return
    for parts, codes, listed in s.bindings.get(rtype, ()):
        for where, value in _values(obj, parts, ""):
            if value not in codes:
                out.append(
                    _clip(
                        f"{_join(label, where)}: not one of the allowed codes "
                        f"{_options(listed)} (required binding)"
                    )
                )
                if limit is not None and len(out) >= limit:
                    return
    for sub_path, sub in _embedded(obj, rtype):
        _collect(sub, _join(label, sub_path), s, out, limit)


# ---------------------------------------------------------------------------------------------
# problem text


def _join(prefix: str, rest: str) -> str:
    if not prefix:
        return rest
    if not rest:
        return prefix
    return f"{prefix}{rest}" if rest.startswith("[") else f"{prefix}.{rest}"


def _path(prefix: str, instance_path: Iterable[str | int]) -> str:
    out = prefix
    for part in instance_path:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, str(part))
    return out


def _clip(problem: str) -> str:
    """Keep absurdly deep paths readable: the start and the end (where the problem is) survive."""
    if len(problem) <= MAX_PROBLEM_CHARS:
        return problem
    return problem[:100] + " ... " + problem[100 - MAX_PROBLEM_CHARS :]


def _short(value: Any) -> str:
    """A schema value or property name as JSON-ish text, at most MAX_VALUE_CHARS (+ '...').

    Never used for an instance value (see "No values" in the module docstring).
    """
    if isinstance(value, str):
        cut = value[:MAX_VALUE_CHARS]
        text = "".join(c if c.isprintable() and c not in "'\\" else _escape(c) for c in cut)
        return f"'{text}...'" if len(value) > MAX_VALUE_CHARS else f"'{text}'"
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def _escape(c: str) -> str:
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t", "'": "\\'", "\\": "\\\\"}.get(
        c, f"\\u{ord(c):04x}"
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _options(options: Any) -> str:
    opts = list(options) if isinstance(options, (list, tuple)) else [options]
    shown = ", ".join(_short(o) for o in opts[:MAX_OPTIONS])
    return f"[{shown}{', ...' if len(opts) > MAX_OPTIONS else ''}]"


def _format(err: jsonschema_rs.ValidationError, prefix: str) -> str:
    kind = err.kind
    path = _path(prefix, err.instance_path)
    value = err.instance  # only its JSON type is ever shown
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
        return f"{_join(path, str(kind.property))}: required property is missing"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.AdditionalProperties):
        names = list(kind.unexpected)
        return "; ".join(f"{_join(path, _short(n)[1:-1])}: unknown property" for n in names)
    where = path or "(root)"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Enum):
        return f"{where}: not one of the allowed codes {_options(kind.options)}"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Constant):
        return f"{where}: must be {_short(kind.expected_value)}"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Type):
        types = kind.types if isinstance(kind.types, list) else [kind.types]
        want = " or ".join(str(t) for t in types)
        return f"{where}: expected {want}, got {_json_type(value)}"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Pattern):
        fmt = _schema().formats.get(kind.pattern) or repr(kind.pattern[:40])
        return f"{where}: not a valid FHIR {fmt}"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Minimum):
        return f"{where}: less than {kind.limit}"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.MinLength):
        return f"{where}: empty string (FHIR strings must have at least one character)"
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.MinItems):
        return f"{where}: array must have at least {kind.limit} item(s)"
    # anything rarer: keyword name only; jsonschema-rs's own message may echo a whole object
    keyword = err.schema_path[-1] if err.schema_path else type(kind).__name__
    return f"{where}: {_json_type(value)} fails schema keyword {keyword!r}"


# ---------------------------------------------------------------------------------------------
# public API


def errors(obj: Any, *, limit: int | None = None) -> list[str]:
    """Every problem in a parsed FHIR resource of any type (empty list if valid)."""
    out: list[str] = []
    _collect(obj, "", _schema(), out, limit)
    return out


#: problems listed in InvalidFhir.detail at most (a hostile body could have millions)
MAX_DETAIL_PROBLEMS = 200


def _invalid(problems: list[str], suffix: str = "") -> InvalidFhir:
    """One line: the first few problems; ``detail`` has up to MAX_DETAIL_PROBLEMS, one a line."""
    head = "; ".join(problems[:MESSAGE_PROBLEMS])
    more = len(problems) - MESSAGE_PROBLEMS
    if more > 0:
        at_least = "at least " if len(problems) >= MAX_DETAIL_PROBLEMS else ""
        head += f" (and {at_least}{more} more)"
    return InvalidFhir(f"invalid FHIR: {head}{suffix}", detail="\n".join(problems))


def _raise(obj: Any) -> None:
    problems = errors(obj, limit=MAX_DETAIL_PROBLEMS)
    if not problems:  # pragma: no cover - the fast and the detailed path disagree
        problems = ["(root): invalid FHIR"]
    raise _invalid(problems)


def validate_resource(obj: Any) -> None:
    """Raise InvalidFhir unless obj is a valid FHIR R4 resource (any type)."""
    if not _is_valid(obj, _schema()):
        _raise(obj)


def _parse_types(allowed_types: str | Iterable[str]) -> frozenset[str]:
    if isinstance(allowed_types, str):
        allowed_types = allowed_types.replace(",", " ").split()
    return frozenset(allowed_types)


def validate_bundle(obj: Any, *, allowed_types: str | Iterable[str] | None = None) -> None:
    """Raise InvalidFhir unless obj is a valid FHIR R4 Bundle.

    ``allowed_types`` (comma- or space-separated, or an iterable) restricts the resource types
    allowed in ``Bundle.entry.resource``.
    """
    if not isinstance(obj, dict):
        raise InvalidFhir(f"invalid FHIR: (root): expected a Bundle object, got {_json_type(obj)}")
    rtype = obj.get("resourceType")
    if rtype != "Bundle":
        if rtype is None:
            what = "resourceType is missing"
        elif isinstance(rtype, str) and rtype in resource_types():  # a type name, not data
            what = f"resourceType is {rtype}"
        else:
            what = "resourceType is not an R4 type"
        raise InvalidFhir(f"invalid FHIR: not a Bundle: {what}")
    validate_resource(obj)
    if allowed_types is not None:
        allowed = _parse_types(allowed_types)
        bad = [
            f"entry[{i}].resource({e['resource']['resourceType']}): type not allowed here"
            for i, e in enumerate(obj.get("entry") or ())
            if "resource" in e and e["resource"]["resourceType"] not in allowed
        ]
        if bad:
            raise _invalid(bad, f" (allowed: {', '.join(sorted(allowed))})")


def parse_and_validate_bundle(
    data: bytes, *, allowed_types: str | Iterable[str] | None = None
) -> dict[str, Any]:
    """Parse bytes once with orjson, check it is a valid FHIR R4 Bundle, return the dict."""
    try:
        obj: dict[str, Any] = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidFhir(f"body is not JSON: {exc}") from None
    validate_bundle(obj, allowed_types=allowed_types)
    return obj
