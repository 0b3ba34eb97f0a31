"""shared.json_files.read_json: the value, or the caller's error naming the file and what is wrong."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError, WeightsError
from shared.json_files import read_json


def test_read_json_returns_the_value_and_names_a_missing_or_broken_file(tmp_path):
    good, broken, missing = tmp_path / "good.json", tmp_path / "broken.json", tmp_path / "none.json"
    good.write_text('{"a": [1, 2]}')
    broken.write_text('{"a": ')
    assert read_json(good, error=ConfigError) == {"a": [1, 2]}
    with pytest.raises(ConfigError, match=r"^run config key 'plan': .*none\.json does not exist$"):
        read_json(missing, error=ConfigError, context="run config key 'plan': ")
    with pytest.raises(WeightsError, match=r"broken\.json is not readable JSON \(Expecting value"):
        read_json(broken, error=WeightsError)
    with pytest.raises(WeightsError, match=r"none\.json does not exist: not an export"):
        read_json(missing, error=WeightsError, missing="does not exist: not an export")
