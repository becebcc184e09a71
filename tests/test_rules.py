from pathlib import Path

import pytest

from engine.rules import RulesError, load_rules, parse_rules


def test_bundled_rules_define_home_pdp_and_cart():
    rules = load_rules()
    assert {"home", "pdp", "cart"} <= set(rules.placements)
    assert "groceries" in rules.categories.repurchase


def test_unknown_field_is_an_error_naming_its_path():
    text = "placements:\n  home:\n    sources: {als: 1.0}\n    colour: blue\n"
    with pytest.raises(RulesError, match=r"placements\.home\.colour"):
        parse_rules(text, Path("rules.yaml"))


def test_unknown_source_is_rejected():
    with pytest.raises(RulesError, match=r"placements\.home\.sources"):
        parse_rules("placements:\n  home:\n    sources: {magic: 1.0}\n", Path("r.yaml"))


def test_default_limit_above_max_limit_is_rejected():
    with pytest.raises(RulesError, match="default_limit"):
        parse_rules("placements:\n  home:\n    default_limit: 20\n    max_limit: 10\n", Path("r.yaml"))


def test_broken_yaml_reports_line_and_column():
    with pytest.raises(RulesError, match=r"r\.yaml: line \d+, column \d+: not valid YAML"):
        parse_rules("placements:\n  home: [unclosed\n", Path("r.yaml"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "absent.yaml")
