"""What `checkpoint.json` may hold, as a small declarative schema, and the check against it.

The tensor files of a checkpoint are protected by checksums recorded in checkpoint.json; the JSON
file cannot hold its own checksum, so it is protected by checking every field instead: types,
ranges, lengths, finite numbers, no unknown fields. `problem(record)` returns the first field that
is wrong, as one line ("step must be an integer >= 0, found -1"), or None. The format name and
version are checked before (checkpoint.validate_record), with their own messages.

A schema node is a function `check(value, where)` that raises Invalid; leaves carry an `expect`
text so that `one_of` can say what it wanted.
"""
import json
import math
import re

FORMAT = "streamtrain-checkpoint"
VERSION = 2  # 2: checksums of the tensor files ('files'); 1 had only their sizes ('file_sizes')
MODEL_FILE, STATE_FILE, JSON_FILE = "model.safetensors", "state.safetensors", "checkpoint.json"
UINT32 = 2**32 - 1


class Invalid(Exception):
    pass


def brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def leaf(expect: str, test):
    def check(value, where):
        if not test(value):
            raise Invalid(f"{where} must be {expect}, found {brief(value)}")
    check.expect = expect
    return check


def integer(low: int = 0, high: int | None = None):
    bounds = f" >= {low}" if high is None else f" in [{low}, {high}]"
    return leaf(f"an integer{bounds}", lambda v: type(v) is int and v >= low and (high is None or v <= high))


def number(low: float | None = None):
    """An int or a finite float (never a bool), at least `low`."""
    return leaf("a finite number" + ("" if low is None else f" >= {low}"),
                lambda v: (type(v) is int or type(v) is float and math.isfinite(v)) and (low is None or v >= low))


def constant(expected):
    return leaf(json.dumps(expected), lambda v: type(v) is type(expected) and v == expected)


TEXT = leaf("a string", lambda v: isinstance(v, str))
BOOL = leaf("true or false", lambda v: isinstance(v, bool))
NULL = leaf("null", lambda v: v is None)
ANY = leaf("any value", lambda v: True)  # free-form JSON: finite numbers are checked for the whole record
DIGEST = leaf("a blake2b hex digest", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{128}", v))


def one_of(*checks):
    def check(value, where):
        for c in checks:
            try:
                return c(value, where)
            except Invalid:
                continue
        raise Invalid(f"{where} must be {' or '.join(c.expect for c in checks)}, found {brief(value)}")
    check.expect = " or ".join(c.expect for c in checks)
    return check


def list_of(item, length: int | None = None):
    expect = f"a list of {length}" if length is not None else "a list"

    def check(value, where):
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise Invalid(f"{where} must be {expect}, found {brief(value)}")
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")
    check.expect = expect
    return check


def sequence(*items):
    """A list of fixed length with one check per position."""
    def check(value, where):
        if not isinstance(value, list) or len(value) != len(items):
            raise Invalid(f"{where} must be a list of {len(items)}, found {brief(value)}")
        for i, (item, v) in enumerate(zip(items, value)):
            item(v, f"{where}[{i}]")
    check.expect = f"a list of {len(items)}"
    return check


def fields(required: dict, optional: dict | None = None, others=None, expect: str = "an object"):
    """An object with the `required` fields, maybe the `optional` ones, and other keys only when
    `others` (their check) is given."""
    def check(value, where):
        if not isinstance(value, dict):
            raise Invalid(f"{where} must be {expect}, found {brief(value)}")
        for key, item in required.items():
            if key not in value:
                raise Invalid(f"{field(where, key)} is missing")
            item(value[key], field(where, key))
        for key, v in value.items():
            if key in required:
                continue
            item = (optional or {}).get(key, others)
            if item is None:
                raise Invalid(f"{field(where, key)} is not a field of {where or JSON_FILE}")
            item(v, field(where, key))
    check.expect = expect
    return check


def map_of(item):
    """An object with any keys, each value checked by `item`."""
    def check(value, where):
        if not isinstance(value, dict):
            raise Invalid(f"{where} must be an object, found {brief(value)}")
        for key, v in value.items():
            item(v, f"{where}[{json.dumps(key)}]")
    check.expect = "an object"
    return check


def field(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


SCALAR = one_of(NULL, BOOL, number(), TEXT)
STATE_ENTRY = one_of(  # checkpoint.save_value: a python scalar, a tuple of them, a tensor, a storage
    SCALAR, list_of(one_of(BOOL, number(), TEXT)),
    fields({"tensor": constant(True)}, expect='{"tensor": true}'),
    fields({"storage": TEXT, "tensors": list_of(TEXT)}, expect='{"storage": ..., "tensors": [...]}'))
RULE = fields({"config": fields({"name": TEXT}, others=ANY), "parameters": list_of(TEXT), "extra": ANY})
RNG = fields({
    "cuda_devices": integer(0),
    "python": sequence(constant(3), list_of(integer(0, UINT32), length=625), one_of(NULL, number())),
    "numpy": sequence(constant("MT19937"), list_of(integer(0, UINT32), length=624), integer(0, 624),
                      integer(0, 1), number())})
FILE = fields({"bytes": integer(0), "blake2b": DIGEST})
RECORD = fields({
    "format": constant(FORMAT), "version": constant(VERSION),
    "step": integer(0), "lr": number(0), "nonfinite_total": integer(0), "nonfinite_in_row": integer(0),
    "position": integer(0), "identity": map_of(ANY), "rules": list_of(RULE),
    "states": map_of(map_of(STATE_ENTRY)), "rng": RNG,
    "metadata": fields({}, optional={"initial_val_loss": one_of(NULL, number())}, others=ANY),
    "saved_at": TEXT, "files": fields({MODEL_FILE: FILE, STATE_FILE: FILE})})


def problem(record: dict) -> str | None:
    """The first field of a checkpoint.json record that is wrong, as one line, or None."""
    try:
        RECORD(record, "")
        nonfinite_check(record, "")
    except Invalid as e:
        return str(e)
    if record["nonfinite_in_row"] > record["nonfinite_total"]:
        return (f"nonfinite_in_row must be at most nonfinite_total ({record['nonfinite_total']}), "
                f"found {record['nonfinite_in_row']}")
    return None


def nonfinite_check(value, where: str) -> None:
    """NaN and infinity anywhere, free-form fields included (json reads them; no field may hold one)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid(f"{where} must be a finite number, found {brief(value)}")
    if isinstance(value, dict):
        for key, v in value.items():
            nonfinite_check(v, field(where, key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            nonfinite_check(v, f"{where}[{i}]")
