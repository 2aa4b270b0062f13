"""JobSpec.normalize (issue 14): null (the model's stored preprocessing), "none", "standardize"
or {"mean", "std"}; anything else is refused with a message naming the entry."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from api.errors import validation_detail
from service.spec import MAX_CHANNELS, JobSpec
from service.submission import spec_document

BASE = {"model": {"arch": {"name": "mlp"}}, "dataset": "synthetic-tiny",
        "steps": [{"op": "evaluate"}]}


@pytest.mark.parametrize("value", ["none", "standardize", {"mean": [0.5], "std": [0.25]},
                                   {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                                   {"mean": [-3, 0], "std": [1, 1e-3]}])
def test_accepted_and_round_trips(value):
    spec = JobSpec.model_validate(BASE | {"normalize": value})
    stored = spec_document(spec)
    assert stored["normalize"] == value
    assert JobSpec.model_validate(stored) == spec


def test_default_is_null_and_left_out_of_the_stored_spec():
    spec = JobSpec.model_validate(BASE)
    assert spec.normalize is None
    assert "normalize" not in spec_document(spec)  # stored specs of older jobs look the same
    assert JobSpec.model_validate(BASE | {"normalize": None}).normalize is None


@pytest.mark.parametrize(("value", "needle"), [
    ("standardise", "'none', 'standardize'"),
    ("", "'none', 'standardize'"),
    (1, "'none', 'standardize'"),
    ([0.5], "'none', 'standardize'"),
    ({"mean": [0.5]}, "missing std"),
    ({"std": [0.5]}, "missing mean"),
    ({"mean": [0.5], "std": [1], "scale": 2}, "unknown keys ['scale']"),
    ({"mean": [0.5, 0.5], "std": [1]}, "normalize.mean has 2 entries but normalize.std has 1"),
    ({"mean": [], "std": []}, "normalize.mean must be a list of 1.."),
    ({"mean": 0.5, "std": 1}, "normalize.mean must be a list"),
    ({"mean": [0.5], "std": [0]}, "normalize.std[0] must be > 0"),
    ({"mean": [0.5, 0.5], "std": [1, -1]}, "normalize.std[1] must be > 0"),
    ({"mean": [math.nan], "std": [1]}, "normalize.mean[0] must be a finite number"),
    ({"mean": [0], "std": [math.inf]}, "normalize.std[0] must be a finite number"),
    ({"mean": ["0.5"], "std": [1]}, "normalize.mean[0] must be a finite number"),
    ({"mean": [True], "std": [1]}, "normalize.mean[0] must be a finite number"),
    ({"mean": [0.0] * (MAX_CHANNELS + 1), "std": [1.0] * (MAX_CHANNELS + 1)},
     f"1..{MAX_CHANNELS}"),
])
def test_refused_naming_the_entry(value, needle):
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(BASE | {"normalize": value})
    errors = err.value.errors()
    assert len(errors) == 1 and errors[0]["loc"] == ("normalize",)  # one message, not per member
    detail = validation_detail([{**errors[0], "loc": ("body", *errors[0]["loc"])}])
    assert detail.startswith("normalize: ") and needle in detail, detail


def test_the_json_schema_documents_the_field():
    schema = JobSpec.model_json_schema()
    text = str(schema["properties"]["normalize"])
    assert "standardize" in text and "Normalization" in text
