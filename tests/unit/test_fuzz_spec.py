"""Fuzzed specs: whatever object a user (or a broken client) sends, parse_spec either accepts it
or raises SpecError naming a real field, never anything else; and load_config agrees with it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from fuzzkit import (
    FUZZ,
    KNOWN_KEYS,
    NASTY_STRINGS,
    VALID_SPECS,
    dotted,
    field_resolves,
    json_values,
    mutate,
    paths,
)
from hypothesis import given
from hypothesis import strategies as st

from finetune_api.spec import FineTuneSpec, SpecError, load_config, parse_spec

# Cross-field rules report on the other field of the pair, so a mutation may surface there.
CROSS_FIELDS = ("spec.lora", "spec.export.formats", "spec.training.precision", "spec.dataset.columns.",
                "spec.training.lossParams", "spec.model.fromJob", "spec.dataset", "spec.dataset.eval")
MAX_MESSAGE = 2048  # a rejection lands in status.message and an Event: it must stay readable


def outcome(spec: Any) -> FineTuneSpec | SpecError:
    """parse_spec's result or its SpecError; any other exception fails the test."""
    before = copy.deepcopy(spec)
    try:
        result: FineTuneSpec | SpecError = parse_spec(spec)
    except SpecError as e:
        result = e
    assert _same(spec, before), "parse_spec changed its input"
    return result


def _same(a: Any, b: Any) -> bool:
    # NaN != NaN, so compare through repr (the structures were deep-copied, not rebuilt)
    return repr(a) == repr(b)


def check_error(err: SpecError, spec: Any) -> None:
    assert err.field and err.message, err
    assert str(err).startswith(err.field + ": "), str(err)
    assert field_resolves(spec, err.field), f"{err.field!r} is not a path into the spec: {err}"
    assert len(err.message) <= MAX_MESSAGE, f"{err.field}: message of {len(err.message)} characters"


def related(field: str, mutated: str) -> bool:
    return field.startswith(mutated) or mutated.startswith(field) or field.startswith(CROSS_FIELDS)


@pytest.mark.parametrize("i", range(len(VALID_SPECS)))
def test_the_fuzz_seeds_are_valid_and_parse_idempotently(i: int) -> None:
    s = parse_spec(copy.deepcopy(VALID_SPECS[i]))
    assert s.raw == VALID_SPECS[i]
    assert parse_spec(s.raw) == s


@FUZZ
@given(json_values(max_leaves=30))
def test_random_objects_are_accepted_or_rejected_with_a_field(spec: Any) -> None:
    r = outcome(spec)
    if isinstance(r, SpecError):
        check_error(r, spec)


@FUZZ
@given(st.fixed_dictionaries({}, optional={k: json_values(8) for k in sorted(KNOWN_KEYS)}))
def test_random_objects_shaped_like_specs(spec: dict[str, Any]) -> None:
    spec.setdefault("dataset", {"inline": [{"anchor": "a", "positive": "b"}]})
    r = outcome(spec)
    if isinstance(r, SpecError):
        check_error(r, spec)
    else:
        assert parse_spec(r.raw) == r


@FUZZ
@given(st.data())
def test_one_mutation_of_a_valid_spec_is_accepted_or_rejected_at_that_field(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(VALID_SPECS), label="base")
    path = data.draw(st.sampled_from(paths(base)[1:]), label="path")
    op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]), label="op")
    value = data.draw(st.one_of(json_values(6), st.sampled_from(NASTY_STRINGS)), label="value")
    spec = mutate(base, path, op, value)
    r = outcome(spec)
    if isinstance(r, SpecError):
        check_error(r, spec)
        where = dotted(path[:-1]) if op == "add" else dotted(path)
        assert related(r.field, where), f"mutating {where} ({op}) was reported at {r.field}: {r}"


@FUZZ
@given(st.data())
def test_several_mutations_never_crash(data: st.DataObject) -> None:
    spec = copy.deepcopy(data.draw(st.sampled_from(VALID_SPECS)))
    for _ in range(data.draw(st.integers(2, 5))):
        choices = paths(spec)[1:]
        if not choices or not isinstance(spec, dict):
            break
        path = data.draw(st.sampled_from(choices))
        op = data.draw(st.sampled_from(["replace", "delete", "add"]))
        spec = mutate(spec, path, op, data.draw(st.one_of(json_values(4), st.sampled_from(NASTY_STRINGS))))
    r = outcome(spec)
    if isinstance(r, SpecError):
        check_error(r, spec)


def _load(text: str) -> FineTuneSpec | SpecError:
    try:
        return load_config(text)[1]
    except SpecError as e:
        return e


@FUZZ
@given(st.data())
def test_load_config_agrees_with_parse_spec_through_yaml_and_json(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(VALID_SPECS))
    path = data.draw(st.sampled_from(paths(base)[1:]))
    spec = mutate(base, path, "replace", data.draw(json_values(5)))
    direct = outcome(spec)
    try:
        as_json = json.dumps({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                              "metadata": {"name": "x"}, "spec": spec}, allow_nan=True)  # fmt: skip
    except (TypeError, ValueError):  # non-string keys: JSON cannot carry them, YAML can
        as_json = None
    for text in filter(None, [as_json, yaml.safe_dump({"spec": spec}, allow_unicode=True)]):
        via = _load(text)
        assert type(via) is type(direct), (text[:300], via, direct)
        if isinstance(via, SpecError):
            assert isinstance(direct, SpecError) and via.field == direct.field


@FUZZ
@given(st.one_of(json_values(10), st.text(max_size=200), st.binary(max_size=100).map(lambda b: b.decode("latin-1"))))
def test_load_config_of_any_text_raises_only_spec_errors(doc: Any) -> None:
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
    r = _load(text)
    if isinstance(r, SpecError):
        assert r.field and r.message
