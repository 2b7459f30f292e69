"""Byte sizes: '24GB' is 10^9-based, '24GiB' 2^30-based; anything else is refused clearly."""
import pytest

from streamtrain.config import ConfigError, TrainConfig
from streamtrain.memory.units import format_bytes, parse_bytes
from streamtrain.run import main


@pytest.mark.parametrize("text, expected", [
    ("24GB", 24 * 10**9),
    ("24GiB", 24 * 2**30),
    ("24000MB", 24 * 10**9),
    ("22.5GiB", 24_159_191_040),          # 22.5 * 2^30 exactly
    ("24 gb", 24 * 10**9),                # case-insensitive, optional space
    ("512KiB", 512 * 1024),
    ("1.5TB", 1_500_000_000_000),
    ("2tib", 2 * 2**40),
    ("100MB", 100_000_000),
    (".5GB", 500_000_000),
])
def test_sizes_parse_in_both_conventions(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["abc", "-1GB", "24XB", "", "24", "GB", "0GB", "1e9B", "24 G B", None])
def test_bad_sizes_get_one_line_naming_the_string_and_the_forms(text):
    with pytest.raises(ValueError) as error:
        parse_bytes(text)
    message = str(error.value)
    assert "\n" not in message
    assert repr(text) in message
    assert "24GB" in message  # the accepted forms (or the fix) are named


def test_format_prints_both_units():
    assert format_bytes(24 * 10**9) == "24.00 GB (22.35 GiB)"
    assert format_bytes(24 * 2**30) == "25.77 GB (24.00 GiB)"
    assert format_bytes(59_260_000) == "59.26 MB (56.51 MiB)"


def test_config_and_cli_refuse_a_bad_budget(capsys):
    with pytest.raises(ConfigError, match=r"^--budget: cannot read the size '24XB'"):
        TrainConfig(budget="24XB").validate()
    assert main(["--budget", "abc", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --budget: cannot read the size 'abc'") and "\n" not in err
