from pathlib import Path

import pytest

from engine.rules import EpsilonGreedy, Greedy, RulesError, Thompson, load_rules, parse_rules


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


def test_exploration_defaults_to_greedy_and_parses_a_shadow_policy():
    text = (
        "placements:\n  home:\n"
        "    exploration: {policy: epsilon_greedy, epsilon: 0.2, pool: 40}\n"
        "    shadow: {policy: thompson, prior_strength: 8}\n"
        "  pdp: {}\n"
    )
    rules = parse_rules(text, Path("r.yaml"))
    home = rules.placement("home")
    assert isinstance(home.exploration, EpsilonGreedy)
    assert home.exploration.params() == {"epsilon": 0.2, "pool": 40}
    assert isinstance(home.shadow, Thompson)
    assert home.shadow.params() == {"prior_ctr": 0.05, "prior_strength": 8.0, "samples": 100, "pool": 30}
    assert isinstance(rules.placement("pdp").exploration, Greedy)
    assert rules.placement("pdp").shadow is None


@pytest.mark.parametrize(
    "exploration",
    ["{policy: ucb}", "{policy: epsilon_greedy, epsilon: -0.1}", "{policy: softmax, temperature: 0}"],
)
def test_unknown_policy_or_bad_parameter_is_an_error_naming_its_path(exploration):
    text = f"placements:\n  home:\n    exploration: {exploration}\n"
    with pytest.raises(RulesError, match=r"placements\.home\.exploration"):
        parse_rules(text, Path("r.yaml"))
