"""d2ops.utils.jsonio: strict JSON (non-finite numbers become null) written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from d2ops.utils.jsonio import dumps, strict, write_json


def test_non_finite_numbers_become_null_at_any_depth() -> None:
    value = {"AP": 51.2, "APl": float("nan"), "per_class": {"a": float("inf")}, "curve": (1.0, -math.inf)}
    assert strict(value) == {"AP": 51.2, "APl": None, "per_class": {"a": None}, "curve": [1.0, None]}
    assert strict({"n": np.float32("nan"), "k": np.int64(3), "arr": np.array([1.5, np.nan])}) == {
        "n": None,
        "k": 3,
        "arr": [1.5, None],
    }
    assert json.loads(dumps(value)) == strict(value)


def test_dumps_refuses_what_it_cannot_make_strict() -> None:
    class Weird(float):
        pass

    assert dumps({"x": Weird("nan")}) == '{"x": null}', "float subclasses are floats"
    with pytest.raises(TypeError):
        dumps({"x": object()})
    assert dumps({"x": object()}, default=lambda o: "obj") == '{"x": "obj"}'


def test_write_is_atomic_readable_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = write_json(tmp_path / "summary.json", {"AP": float("nan")})
    assert target.read_text() == '{\n  "AP": null\n}'
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"AP": None}, "the old file stays whole"
    assert os.listdir(tmp_path) == ["summary.json"], "no temporary file left behind"


SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_the_published_output_schemas_are_the_models_and_say_what_null_means() -> None:
    """docs/schemas is what ``python -m d2ops.outputs docs/schemas`` writes from d2ops.outputs; every
    measured number there allows null and says that null is 'not measured'; NaN is refused."""
    import jsonschema
    from pydantic import ValidationError

    from d2ops.outputs import NOT_MEASURED, SummaryBox, json_schemas

    for name, schema in json_schemas().items():
        written = json.loads((SCHEMAS / name).read_text())
        assert written == schema, f"regenerate {name}: python -m d2ops.outputs docs/schemas"
    summary = json_schemas()["summary.schema.json"]
    apl = summary["$defs"]["SummaryBox"]["properties"]["APl"]
    assert {"type": "null"} in apl["anyOf"] and NOT_MEASURED in json.dumps(summary)
    box = {"AP": 50.0, "AP50": 90.0, "AP75": 40.0, "APs": None, "APm": 48.0, "APl": None, "per_class": {"a": None}}
    jsonschema.validate(box, {**summary["$defs"]["SummaryBox"], "$defs": summary["$defs"]})
    with pytest.raises(jsonschema.ValidationError):  # a writer that spells NaN as a string
        jsonschema.validate({**box, "APl": "NaN"}, {**summary["$defs"]["SummaryBox"], "$defs": summary["$defs"]})
    with pytest.raises(ValidationError, match="finite number"):  # what a lenient parser makes of NaN
        SummaryBox.model_validate({**box, "APl": float("nan")})
