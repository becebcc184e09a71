"""The README's ESP templates, rendered by a real Liquid engine (python-liquid) against the live endpoint."""

import html
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from liquid import Environment

from api.app import create_app
from api.settings import Settings
from tests.conftest import load_shop

TEMPLATES = Path(__file__).resolve().parents[1] / "api" / "email_templates"
README = Path(__file__).resolve().parents[1] / "README.md"
CONNECTED = re.compile(r"\{% connected_content (\S+) .*?:save (\w+).*?%\}")


@pytest.fixture
def client(redis_url, keys, shop_dir, trained, tmp_path) -> Iterator[TestClient]:
    registry = tmp_path / "registry"
    shutil.copytree(trained.registry.root, registry)
    load_shop(redis_url, keys, shop_dir)
    settings = Settings(registry_dir=registry, key_prefix=keys.prefix, redis_timeout_ms=2000)
    with TestClient(create_app(settings, redis_url=redis_url)) as c:
        yield c


def _fetch(client: TestClient, url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    r = client.get(f"{parts.path}?{parts.query}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def render_braze(client: TestClient, campaign: str, customer: str) -> tuple[str, dict[str, Any]]:
    """Braze's part: expand its ${...} attributes, run connected_content, then plain Liquid renders the rest."""
    source = (TEMPLATES / "braze.liquid").read_text(encoding="utf-8")
    match = CONNECTED.search(source)
    assert match is not None
    url = match.group(1).replace("{{campaign.${api_id}}}", campaign).replace("{{${user_id}}}", customer)
    saved = _fetch(client, url)
    template = Environment().from_string(source[: match.start()] + source[match.end() :])
    return template.render(**{match.group(2): saved}), saved


def render_klaviyo(client: TestClient, campaign: str, customer: str) -> tuple[str, dict[str, Any]]:
    """Klaviyo fetches the web feed per profile and exposes it as feeds.<name>."""
    feed = _fetch(client, f"/v1/email/slots/{campaign}/{customer}?placement=email:weekly")
    template = Environment().from_string((TEMPLATES / "klaviyo.liquid").read_text(encoding="utf-8"))
    return template.render(feeds={"nextbest": feed}), feed


def _check(rendered: str, feed: dict[str, Any]) -> None:
    assert feed["slots"], "no slot"
    for slot in feed["slots"]:
        assert slot["title"], f"empty slot {slot['position']}"
        assert html.escape(slot["title"]) in rendered
        assert slot["click_url"] in rendered and "/v1/email/click/" in slot["click_url"]
        if slot["price_formatted"]:
            assert slot["price_formatted"] in rendered
    assert rendered.count("<a href=") >= len(feed["slots"])


@pytest.mark.parametrize("render", [render_braze, render_klaviyo])
@pytest.mark.parametrize("customer", ["c1", "c2", "never-seen"])
def test_template_renders_titles_prices_and_signed_links_in_every_slot(client, render, customer):
    rendered, feed = render(client, "wk48", customer)
    _check(rendered, feed)
    if customer == "never-seen":
        assert feed["fallback"] is True and feed["fallback_reason"] == "unknown_customer"


def test_readme_shows_the_templates_that_are_tested():
    readme = README.read_text(encoding="utf-8")
    for name in ("braze.liquid", "klaviyo.liquid"):
        assert (TEMPLATES / name).read_text(encoding="utf-8").strip() in readme, f"README's {name} is out of date"
