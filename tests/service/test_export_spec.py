"""service.methods.export: the export step's fields accepted, stored and validated again; every
refusal names its field; export is a real op (no longer 422 "not available yet")."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.methods.export import MAX_OPSET, MIN_OPSET
from service.registry import available_ops, dense_weight_ops
from service.spec import JobSpec
from service.submission import spec_document

TRAIN = {"op": "train", "epochs": 1}


def job(*steps):
    return {"model": {"arch": {"name": "mlp"}}, "dataset": "synthetic-tiny", "steps": list(steps)}


def export(**fields):
    return {"op": "export", **fields}


def test_registered_and_needs_no_dense_weights():
    assert "export" in available_ops() and "export" not in dense_weight_ops()
    # masks export as dense zeros and DCTpS layers as their dense or implicit form: it may
    # follow a dctps step
    JobSpec.model_validate(job({"op": "dctps"}, export()))


@pytest.mark.parametrize("fields", [
    {},
    {"formats": ["onnx"]},
    {"formats": ["pt2"]},
    {"formats": ["pt2", "onnx"], "quantize": "int8_dynamic", "opset": MIN_OPSET},
    {"formats": ["onnx"], "quantize": "int8_static", "calibration_samples": 64,
     "opset": MAX_OPSET, "samples": 1000},
    {"quantize": None},
])
def test_accepted_and_round_trips(fields):
    spec = JobSpec.model_validate(job(TRAIN, export(**fields)))
    assert JobSpec.model_validate(spec_document(spec)) == spec
    stored = spec_document(spec)["steps"][1]
    assert stored["formats"] == fields.get("formats", ["onnx", "pt2"])
    assert stored["opset"] == fields.get("opset", 18) and stored["samples"] >= 256
    assert stored.get("quantize") == fields.get("quantize")


@pytest.mark.parametrize(("fields", "needle"), [
    ({"formats": []}, "export.formats\n  List should have at least 1 item"),
    ({"formats": ["onnx", "onnx"]}, "formats names a format twice"),
    ({"formats": ["tflite"]}, "export.formats.0\n  Input should be 'onnx' or 'pt2'"),
    ({"quantize": "int4"}, "export.quantize\n  Input should be 'int8_dynamic' or 'int8_static'"),
    ({"quantize": "int8_static", "formats": ["pt2"]}, "add 'onnx' to formats"),
    ({"opset": MIN_OPSET - 1}, f"export.opset\n  Input should be greater than or equal to "
                               f"{MIN_OPSET}"),
    ({"opset": MAX_OPSET + 1}, f"export.opset\n  Input should be less than or equal to "
                               f"{MAX_OPSET}"),
    ({"samples": 255}, "export.samples\n  Input should be greater than or equal to 256"),
    ({"calibration_samples": 64}, "calibration_samples: only used with quantize 'int8_static'"),
    ({"calibration_samples": 0, "quantize": "int8_static"}, "export.calibration_samples"),
    ({"dctps": "implicit"}, "export.dctps\n  Extra inputs are not permitted"),
])
def test_refusals_name_the_field(fields, needle):
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(job(export(**fields)))
    assert needle in str(err.value), str(err.value)


def test_export_is_the_last_step():
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(job(export(), TRAIN))
    assert "steps[0]: export must be the job's last step" in str(err.value)
    with pytest.raises(ValidationError):
        JobSpec.model_validate(job(export(), export()))
