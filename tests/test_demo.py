"""What `nextbest demo` prints for an email: every slot with its type, and a curl command that can be copied."""

import io
from pathlib import Path

from rich.console import Console

from api.demo import print_email


def _slot(position: int, kind: str, title: str, price: str) -> dict[str, object]:
    link = f"http://127.0.0.1:8000/v1/email/click/r1.{'A' * 80}{position}"
    return {"position": position, "type": kind, "title": title, "price_formatted": price, "click_url": link}


def test_an_email_shows_each_slots_type_title_and_price_and_a_whole_curl_line() -> None:
    data = {
        "locale": "de_DE",
        "currency": "EUR",
        "fallback": False,
        "fallback_reason": None,
        "source": "decided",
        "slots": [_slot(1, "product", "[Sale] Oat Milk [bold]", "0,99 €"), _slot(2, "offer", "Double points", "")],
    }
    url = "http://127.0.0.1:8000/v1/email/slots/weekly-2026-49/c2055?placement=email:weekly&slots=4"
    out = io.StringIO()
    print_email(
        Console(file=out, width=60), "weekly-2026-49", "c2055", data, {**data, "source": "stored"}, Path("x.html"), url
    )
    lines = out.getvalue().splitlines()
    assert lines[0] == "email 'weekly-2026-49' to c2055 (de_DE, EUR)"
    assert lines[1].rstrip() == "  1. [product] [Sale] Oat Milk [bold]  0,99 €"  # the link (cut short) wraps below
    assert "  2. [offer] Double points" in [x.rstrip() for x in lines]
    assert "returned the same content (stored)" in " ".join(out.getvalue().split())
    assert f"  curl -s '{url}'" in lines
