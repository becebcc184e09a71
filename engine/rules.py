"""Business rules from one YAML file (placements and category rules), validated once at load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.email_config import EmailSettings
from engine.offers_config import Offer, OfferSettings

Source = Literal["als", "buy_again", "neighbours", "recent_neighbours", "bestsellers"]
SOURCES: tuple[str, ...] = ("als", "buy_again", "neighbours", "recent_neighbours", "bestsellers")
DEFAULT_RULES_FILE = Path(__file__).with_name("rules.default.yaml")


class _Loader(yaml.SafeLoader):
    """SafeLoader that leaves dates as text, so a bad date is a validation error naming its field."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class RulesError(ValueError):
    """The rules file is invalid; the message names the file and the field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rerank(_Strict):
    """Final score = affinity·w + margin·w + stock·w, then at most N items per category."""

    affinity: float = Field(0.8, ge=0, le=10)
    margin: float = Field(0.15, ge=0, le=10)
    stock: float = Field(0.05, ge=0, le=10)
    stock_reference: int = Field(20, ge=1, description="stock at or above which an item counts as fully stocked")
    max_per_category: int = Field(3, ge=1, le=1000)


class Filters(_Strict):
    exclude_context: bool = True
    exclude_purchased: bool = True
    allow_repurchase: bool = False  # True: bought items may come back in every category


class _Policy(_Strict):
    """Shared by the exploration specs: each names itself and can list its parameters for the decision log."""

    def params(self) -> dict[str, float | int]:
        """The tuning parameters (everything but the policy name), so a logged decision says how it explored."""
        return self.model_dump(exclude={"policy"})


_POOL_DESCRIPTION = "how many top-ranked candidates the policy chooses among"


class Greedy(_Policy):
    """Always the best-scored remaining candidate: reproduces the ranker's order exactly."""

    policy: Literal["greedy"] = "greedy"
    pool: int = Field(30, ge=1, le=500, description=_POOL_DESCRIPTION)


class EpsilonGreedy(_Policy):
    """With probability epsilon a uniformly random remaining candidate, otherwise the best one."""

    policy: Literal["epsilon_greedy"] = "epsilon_greedy"
    epsilon: float = Field(0.1, gt=0, le=1)
    pool: int = Field(30, ge=1, le=500, description=_POOL_DESCRIPTION)


class Softmax(_Policy):
    """Candidates drawn with probability proportional to exp(score / temperature)."""

    policy: Literal["softmax"] = "softmax"
    temperature: float = Field(0.1, gt=0, le=100)
    pool: int = Field(30, ge=1, le=500, description=_POOL_DESCRIPTION)


class Thompson(_Policy):
    """Beta-Bernoulli Thompson sampling on observed clicks, with the ranker's score as the prior."""

    policy: Literal["thompson"] = "thompson"
    prior_ctr: float = Field(
        0.05, gt=0, lt=1, description="expected click rate of the best-ranked candidate (the prior's scale)"
    )
    prior_strength: float = Field(
        50.0, ge=0, le=100_000, description="impressions the ranker's prior is worth (0: uniform Beta(1, 1))"
    )
    samples: int = Field(100, ge=10, le=10000, description="Monte Carlo draws estimating each slot's probabilities")
    pool: int = Field(30, ge=1, le=500, description=_POOL_DESCRIPTION)


class ThompsonLift(_Policy):
    """Thompson sampling on a per-item correction of the ranker's personalised click estimate.

    Each item has a lift λ (Gamma posterior, prior mean 1) on the expected click rate the ranker gives
    it for this customer (`prior_ctr` × score relative to the pool's best): clicks against the clicks
    the ranker expected. A ranker that is off by a constant factor for every item changes nothing, so
    the ranking stays personal while items that beat or miss their estimate move up or down.
    """

    policy: Literal["thompson_lift"] = "thompson_lift"
    prior_ctr: float = Field(
        0.05, gt=0, lt=1, description="click rate the ranker's best pool item is expected to have (the scale)"
    )
    prior_strength: float = Field(
        10.0, gt=0, le=100_000, description="expected clicks the prior lift of 1 is worth (higher: explores less)"
    )
    samples: int = Field(64, ge=10, le=10000, description="Monte Carlo draws estimating each slot's probabilities")
    pool: int = Field(30, ge=1, le=500, description=_POOL_DESCRIPTION)


Exploration = Annotated[Greedy | EpsilonGreedy | Softmax | Thompson | ThompsonLift, Field(discriminator="policy")]


class Placement(_Strict):
    """A named group of slots with its candidate sources, filters, re-ranking and exploration policy.

    `exploration` picks the shown items from the top `pool` re-ranked candidates and reports each slot's
    propensity; `shadow`, when set, is a second policy whose propensities for the shown items are logged
    next to the live ones but which never chooses what is shown, so it can be judged off-policy before it goes live.
    """

    description: str = ""
    default_limit: int = Field(10, ge=1, le=100)
    max_limit: int = Field(50, ge=1, le=100)
    sources: dict[Source, float] = Field(
        default_factory=lambda: {"als": 1.0, "bestsellers": 0.3},  # type: ignore[arg-type]
        description="candidate source -> weight of its (normalised) score",
    )
    candidates_per_source: int = Field(200, ge=10, le=5000)
    filters: Filters = Filters()
    rerank: Rerank = Rerank()
    exploration: Exploration = Greedy()
    shadow: Exploration | None = None
    offer_slots: int = Field(
        0, ge=0, le=5, description="email: slots after the products filled with next best offers for the channel"
    )

    @model_validator(mode="after")
    def _limits(self) -> Placement:
        if self.default_limit > self.max_limit:
            raise ValueError("default_limit must not exceed max_limit")
        if not self.sources:
            raise ValueError("a placement needs at least one candidate source")
        return self


class Categories(_Strict):
    repurchase: frozenset[str] = frozenset()
    default_repurchase_days: float = Field(30.0, gt=0, le=3650)


class Rules(_Strict):
    version: int = 1
    categories: Categories = Categories()
    placements: dict[str, Placement]
    offers: dict[str, Offer] = Field(default_factory=dict)
    offer_settings: OfferSettings = OfferSettings()
    email: EmailSettings = EmailSettings()

    @model_validator(mode="after")
    def _has_placements(self) -> Rules:
        if not self.placements:
            raise ValueError("at least one placement is required")
        return self

    def placement(self, name: str) -> Placement:
        return self.placements[name]


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid rules ({err.error_count()} error(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_rules(text: str, path: Path) -> Rules:
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader without timestamps
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RulesError(f"{path}:{where}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RulesError(f"{path}: the rules file must be a mapping with a 'placements' key")
    try:
        return Rules.model_validate(raw)
    except ValidationError as exc:
        raise RulesError(_format_error(path, exc)) from exc


def load_rules(path: Path | None = None) -> Rules:
    """Read and validate a rules file; raises RulesError naming the file and the field."""
    p = path or DEFAULT_RULES_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{p}: cannot read rules file: {exc.strerror}") from exc
    return parse_rules(text, p)
