"""`nextbest demo`: the whole path from a synthetic shop to live decisions, on this machine."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from api.readiness import wait_until_ready
from api.settings import get_settings


def _show(
    console: Console, base: str, body: dict[str, Any], titles: dict[str, tuple[str, str, float]]
) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/recommendations", json=body, timeout=5.0)
    data: dict[str, Any] = r.json()
    ctx = body.get("context") or {}
    head = f"{body['placement']} for {body['customer_id']}" + (f" (context {ctx})" if ctx else "")
    flag = f" [yellow]fallback: {data['fallback_reason']}[/yellow]" if data.get("fallback") else ""
    table = Table(title=f"{escape(head)}{flag}", title_justify="left")
    for col in ("#", "item", "title", "category", "price", "score", "p"):
        table.add_column(col)
    table.add_column("reasons", overflow="fold")
    for it in data["items"]:
        title, cat, price = titles.get(it["item_id"], ("?", "?", 0.0))
        table.add_row(
            str(it["position"]),
            it["item_id"],
            escape(title),
            escape(cat),
            f"{price:.2f}",
            f"{it['score']:.3f}",
            f"{it['propensity']:.2f}",
            ", ".join(it["reasons"]),
        )
    console.print(table)
    _curl(console, f"-X POST {base}/v1/recommendations -H 'content-type: application/json' -d '{_json(body)}'")
    console.print()
    return data


def _show_offers(console: Console, base: str, body: dict[str, Any]) -> None:
    """Next best offers with every factor of their priority, and why the others were left out."""
    data = httpx.post(f"{base}/v1/offers/next-best", json=body, timeout=5.0).json()
    flag = " [yellow]holdout (control group)[/yellow]" if data["holdout"] else ""
    table = Table(title=f"next best offers on {body['channel']} for {body['customer_id']}{flag}", title_justify="left")
    for col in ("#", "offer", "class", "priority", "propensity", "value", "lever", "context", "segment"):
        table.add_column(col)
    for o in data["offers"]:
        e = o["explanation"]
        table.add_row(
            str(o["position"]),
            escape(o["title"]),
            o["priority_class"],
            f"{o['priority']:.3f}",
            f"{e['propensity']:.3f} ({e['propensity_source']})",
            f"{e['value']:.2f}",
            f"{e['lever']:g}",
            f"{e['context_weight']:g}",
            str(e["segment"]),
        )
    console.print(table)
    for offer_id, why in sorted(data["not_shown"].items()):
        console.print(Text(f"  not shown: {offer_id}: {why}", style="dim"))
    _curl(console, f"-X POST {base}/v1/offers/next-best -H 'content-type: application/json' -d '{_json(body)}'")
    console.print()


def _show_email(console: Console, base: str, campaign: str, customer: str, out_dir: Path) -> None:
    """The email a recipient gets: slots as the ESP template renders them, and the HTML block saved to a file."""
    url = f"{base}/v1/email/slots/{campaign}/{customer}?placement=email:weekly&slots=4"
    data = httpx.get(url, timeout=5.0).json()
    again = httpx.get(url, timeout=5.0).json()
    html = httpx.get(url + "&format=html", timeout=5.0).text
    path = out_dir / f"demo-email-{customer}.html"
    path.write_text(html, encoding="utf-8")
    print_email(console, campaign, customer, data, again, path, url)


def print_email(
    console: Console, campaign: str, customer: str, data: dict[str, Any], again: dict[str, Any], path: Path, url: str
) -> None:
    """One recipient's email as the demo shows it: each slot's type, title, price and link, whether a second
    call returned the same content, and the call itself (one line, to copy)."""
    why = f" — fallback: {data['fallback_reason']}" if data["fallback"] else ""
    head = Text.assemble((f"email '{campaign}' to {customer}", "bold"), f" ({data['locale']}, {data['currency']}){why}")
    console.print(head)
    for s in data["slots"]:
        price = f"  {s['price_formatted']}" if s["price_formatted"] else ""
        link = s["click_url"]
        console.print(
            Text.assemble(f"  {s['position']}. [{s['type']}] {s['title']}{price}  ", (f"{link[:60]}…", "dim"))
        )
    same = "the same content" if again["slots"] == data["slots"] else "[red]different content[/red]"
    console.print(
        f"  [dim]a second call (retry, open) returned {same} ({again['source']}); HTML: {escape(str(path))}[/dim]"
    )
    _curl(console, f"'{url}'")
    console.print()


def _json(body: dict[str, Any]) -> str:
    return orjson.dumps(body).decode()


def _curl(console: Console, args: str) -> None:
    """A curl command to copy: one line however narrow the terminal (it wraps it, nothing is folded into it)."""
    console.print(Text(f"  curl -s {args}", style="dim"), soft_wrap=True)


def _arm(client: Any, keys: Any, item: str) -> tuple[int, int]:
    n, s = client.hget(keys.arm_impressions("home"), item), client.hget(keys.arm_successes("home"), item)
    return int(n or 0), int(s or 0)


def _show_click_effect(
    console: Console, base: str, url: str, customer: str, titles: dict[str, tuple[str, str, float]]
) -> None:
    """The learning loop, visibly: a click on the last item feeds the placement's bandit state on every worker."""
    import redis

    from feature_store.keys import Keys

    settings = get_settings()
    arms_key = Keys(settings.key_prefix)
    store = redis.Redis.from_url(url)
    home = {"customer_id": customer, "placement": "home", "limit": 6}
    first = _show(console, base, home, titles)
    clicked = first["items"][-1]
    before = _arm(store, arms_key, clicked["item_id"])
    feedback = {"decision_id": first["decision_id"], "action": clicked["item_id"], "reward": "click"}
    r = httpx.post(f"{base}/v1/feedback", json=feedback, timeout=5)
    console.print(
        f"[bold]POST /v1/feedback[/bold] {customer} clicks {clicked['item_id']} "
        f"({escape(titles[clicked['item_id']][0])}), shown at #{clicked['position']} "
        f"with p={clicked['propensity']:.2f} -> {r.status_code} {escape(str(r.json()))}"
    )
    _curl(console, f"-X POST {base}/v1/feedback -H 'content-type: application/json' -d '{_json(feedback)}'")
    time.sleep(settings.arms_refresh_s + 0.5)  # every worker re-reads the bandit state each interval
    after = _arm(store, arms_key, clicked["item_id"])
    console.print(
        f"  home's bandit state for {clicked['item_id']}: clicks/impressions {before[1]}/{before[0]} -> "
        f"{after[1]}/{after[0]}, shared by every worker through Redis. home shows softmax and learns "
        "thompson_lift in the shadow (logged with its propensities); `nextbest bench ope --log` says when "
        "it would beat the live policy\n"
    )
    store.close()


def _show_event_effect(
    console: Console, base: str, customer: str, catalog: Any, titles: dict[str, tuple[str, str, float]]
) -> None:
    """Read-your-writes, visibly: the customer views an item of a new category; the next decision follows."""
    home = {"customer_id": customer, "placement": "home", "limit": 6}
    before = {i["item_id"] for i in httpx.post(f"{base}/v1/recommendations", json=home, timeout=5).json()["items"]}
    shown_cats = {titles[i][1] for i in before if i in titles}
    fresh = catalog[~catalog["category"].isin(shown_cats) & (catalog["stock"] > 0) & catalog["active"]]
    item = str(fresh["item_id"].iloc[0])
    event = {
        "event_id": f"demo-{time.time_ns()}",
        "customer_id": customer,
        "type": "view_item",
        "item_id": item,
        "timestamp": int(time.time()),
    }
    r = httpx.post(f"{base}/v1/events", json=event, timeout=5)
    console.print(
        f"[bold]POST /v1/events[/bold] {customer} views {item} "
        f"({escape(titles[item][0])}, {escape(titles[item][1])}) -> {r.status_code} {escape(str(r.json()))}"
    )
    _curl(console, f"-X POST {base}/v1/events -H 'content-type: application/json' -d '{_json(event)}'")
    _show(console, base, home, titles)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on (host, port): the demo checks before minutes of training."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(
    console: Console,
    *,
    customers: int,
    items: int,
    days: int,
    port: int,
    generate: Callable[..., None],
    train: Callable[..., None],
    load: Callable[..., None],
) -> None:
    import pandas as pd

    from api.cli import redis_url

    # SIGTERM (a supervisor, `timeout`) ends the demo like Ctrl-C: the server and the embedded Redis stop too.
    signal.signal(signal.SIGTERM, _interrupt)
    settings = get_settings()
    shop_dir = settings.data_dir / "demo-shop"
    end = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    console.rule("1/4 generate a synthetic shop")
    generate(
        out=shop_dir, customers=customers, items=items, days=days, seed=42, kind="general", fmt="parquet", end=str(end)
    )
    console.rule("2/4 train")
    train(
        data=shop_dir,
        factors=64,
        iterations=15,
        regularization=0.05,
        alpha=2.0,
        test_days=14,
        evaluate=True,
        activate=True,
    )
    with redis_url(settings) as url:
        os.environ["REDIS_URL"] = url
        console.rule("3/4 load Redis")
        load(data=shop_dir)
        console.rule(f"4/4 serve on http://127.0.0.1:{port}")
        exe = Path(sys.executable).with_name("nextbest")
        env = {**os.environ, "REDIS_URL": url, "NEXTBEST_PORT": str(port), "NEXTBEST_HOST": "127.0.0.1"}
        proc = subprocess.Popen([str(exe), "serve"], env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(base, proc)
            catalog = pd.read_parquet(shop_dir / "catalog.parquet")
            titles = {
                r.item_id: (r.title, r.category, float(r.price))
                for r in catalog.itertuples()  # type: ignore[misc]
            }
            events = pd.read_parquet(shop_dir / "events.parquet", columns=["customer_id", "type", "item_id"])
            people = pd.read_parquet(shop_dir / "customers.parquet")
            consenting = set(people.loc[people["consent_personalization"].astype(bool), "customer_id"])
            purchases = events[(events["type"] == "purchase") & events["customer_id"].isin(consenting)]
            buyers = purchases["customer_id"].value_counts()
            heavy = str(buyers.index[0])
            typical = str(buyers.index[len(buyers) // 2])
            item = str(events[events["type"] == "view_item"]["item_id"].value_counts().index[0])
            _show(console, base, {"customer_id": heavy, "placement": "home", "limit": 8}, titles)
            _show(console, base, {"customer_id": typical, "placement": "home", "limit": 6}, titles)
            _show(console, base, {"customer_id": typical, "placement": "pdp", "context": {"item_id": item}}, titles)
            _show_event_effect(console, base, typical, catalog, titles)
            _show_click_effect(console, base, url, typical, titles)
            _show_offers(
                console, base, {"customer_id": heavy, "channel": "web", "limit": 3, "context": {"cart": [item]}}
            )
            _show_offers(console, base, {"customer_id": typical, "channel": "email", "limit": 3})
            _show(
                console, base, {"customer_id": "someone-new", "placement": "cart", "context": {"cart": [item]}}, titles
            )
            campaign = f"weekly-{dt.date.today():%Y-%W}"
            for who in (heavy, typical, "new-subscriber"):
                _show_email(console, base, campaign, who, settings.data_dir)
            console.print(
                f"[bold green]nextbest is serving on {base}[/bold green] — docs: {base}/docs, metrics: {base}/metrics"
            )
            console.print("press Ctrl-C to stop")
            proc.wait()
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
