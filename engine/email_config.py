"""Email settings from the rules YAML: how long stored content lives, where clicks land, and how prices
are shown per country (locale, currency, exchange rate from the catalog's currency)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.offers_config import Duration

DEFAULT_COUNTRY = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CountryFormat(_Strict):
    """How a price is shown to customers of one country: CLDR locale, ISO currency, rate from the catalog's."""

    locale: str = Field(..., pattern=r"^[a-z]{2,3}(_[A-Z]{2})?$", examples=["de_DE"])
    currency: str = Field(..., pattern=r"^[A-Z]{3}$", examples=["EUR"])
    rate: float = Field(1.0, gt=0, le=1_000_000, description="price in this currency = catalog price × rate")


class EmailSettings(_Strict):
    """Connected-content email: stored content, click links and price formatting."""

    content_ttl: Duration = Field(30 * 86_400, description="how long a campaign's stored content is kept ('30d')")
    click_ttl: Duration = Field(90 * 86_400, description="how long a signed click link stays valid ('90d')")
    shop_url: str = Field("https://shop.example.com", description="landing page when an item has no URL")
    utm: dict[str, str] = Field(
        default_factory=lambda: {"utm_source": "nextbest", "utm_medium": "email"},
        description="added to every click's landing URL (utm_campaign and utm_content are set per click)",
    )
    catalog_currency: str = Field("EUR", pattern=r"^[A-Z]{3}$")
    countries: dict[str, CountryFormat] = Field(
        default_factory=lambda: {DEFAULT_COUNTRY: CountryFormat(locale="en_IE", currency="EUR")},
        description="country code (or 'default') -> locale and currency",
    )

    @field_validator("shop_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^\s]+", v):
            raise ValueError("an absolute http(s) URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _has_default(self) -> EmailSettings:
        if DEFAULT_COUNTRY not in self.countries:
            raise ValueError(f"countries needs a {DEFAULT_COUNTRY!r} entry for customers of other countries")
        return self

    def country_format(self, country: str | None) -> CountryFormat:
        return self.countries.get(country or DEFAULT_COUNTRY) or self.countries[DEFAULT_COUNTRY]
