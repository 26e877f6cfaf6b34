"""Property tests: hostile manifests and references only ever fail with our own errors."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from puller import mediatypes as mt
from puller.errors import InvalidReference, ManifestError
from puller.manifest import parse_manifest
from puller.reference import parse_reference

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
keys = st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "subject",
                        "artifactType", "annotations", "digest", "size", "platform"])
manifest_like = st.dictionaries(keys, json_values | st.just(2) | st.sampled_from(sorted(mt.ACCEPT)), max_size=8)
content_types = st.sampled_from(["", "application/json", "text/html", *mt.ACCEPT])


@settings(max_examples=300, deadline=None)
@given(manifest_like, content_types)
def test_parse_manifest_only_raises_manifest_error(doc, content_type):
    try:
        result = parse_manifest(json.dumps(doc).encode(), content_type, source="prop")
    except ManifestError:
        return
    # Whatever was accepted has validated digests and sizes everywhere.
    descs = list(getattr(result, "manifests", ())) + list(getattr(result, "layers", ()))
    if hasattr(result, "config"):
        descs.append(result.config)
    for d in descs:
        assert d.digest.startswith(("sha256:", "sha512:")) and "/" not in d.digest and d.size >= 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_reference_total(text):
    try:
        ref = parse_reference(text)
    except InvalidReference:
        return
    assert ".." not in ref.repository and not ref.repository.startswith("/")
    assert parse_reference(str(ref)) == ref


component = st.from_regex(r"[a-z0-9]{1,5}([_-][a-z0-9]{1,5})?", fullmatch=True)  # no "." : a dotted first component is a host


@settings(max_examples=200, deadline=None)
@given(st.lists(component, min_size=1, max_size=3), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
       st.sampled_from(["", "localhost:5000/", "registry.example.com/", "127.0.0.1:1/"]))
def test_valid_references_round_trip(components, tag, host):
    ref = parse_reference(f"{host}{'/'.join(components)}:{tag}")
    assert ref.tag == tag
    assert ref.repository.endswith("/".join(components))
    assert parse_reference(str(ref)) == ref
