"""The `nextbest` command line: the composition root that wires training, the store, the API and benchmarks.

Each command imports its layer lazily, so `nextbest serve` never loads training code.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from api.console import print_error
from api.settings import Settings, SettingsError, get_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="nextbest: real-time personalization decisions")
registry_app = typer.Typer(no_args_is_help=True, help="Inspect and switch model versions")
app.add_typer(registry_app, name="registry")
log_app = typer.Typer(no_args_is_help=True, help="The decision log: export it for analysis and evaluation")
app.add_typer(log_app, name="log")
# No emoji codes: an API key entry 'esp:email:<hash>' must not print as 'esp✉<hash>'.
console = Console(emoji=False)


def progress_bar() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@contextlib.contextmanager
def redis_url(settings: Settings) -> Iterator[str]:
    """REDIS_URL if set; otherwise the embedded server under the data dir, stopped on exit."""
    if settings.redis_url:
        yield settings.redis_url
        return
    from feature_store.server import EmbeddedRedis

    server = EmbeddedRedis(settings.redis_dir).start()
    try:
        yield server.url
    finally:
        server.stop()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as an exit that unwinds: what `serve` started (the embedded Redis, folders) is then cleaned up."""
    raise SystemExit(0)


def _fail(message: str) -> typer.Exit:
    print_error(console, message)
    return typer.Exit(code=2)


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="folder to write the shop's files into")] = Path("var/shop"),
    customers: Annotated[int, typer.Option(min=1)] = 100_000,
    items: Annotated[int, typer.Option(min=1)] = 5_000,
    days: Annotated[int, typer.Option(min=1)] = 180,
    seed: int = 42,
    kind: Annotated[str, typer.Option(help="general | grocery (a repeat-purchase shop)")] = "general",
    fmt: Annotated[str, typer.Option("--format", help="parquet | csv")] = "parquet",
    end: Annotated[str, typer.Option(help="last day (exclusive), YYYY-MM-DD")] = "2026-11-01",
) -> None:
    """Generate a synthetic shop with known hidden structure (catalog, customers, events, truth)."""
    from training.generator import ShopSpec, generate_shop

    if kind not in ("general", "grocery") or fmt not in ("parquet", "csv"):
        raise _fail("--kind must be general|grocery and --format parquet|csv")
    try:
        spec = ShopSpec(customers, items, days, seed, dt.date.fromisoformat(end), kind, fmt)  # type: ignore[arg-type]
        spec.validate()
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    with progress_bar() as bar:
        task = bar.add_task("generating", total=100)

        def step(name: str, fraction: float) -> None:
            bar.update(task, description=f"generating: {name}", completed=int(fraction * 100))

        shop = generate_shop(spec, out, progress=step)
        bar.update(task, completed=100)
    console.print(f"wrote {out}: {shop.n_customers:,} customers, {shop.n_items:,} items, {shop.n_events:,} events")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="folder with catalog, customers, events (csv or parquet)")] = Path(
        "var/shop"
    ),
    factors: int = 64,
    iterations: int = 15,
    regularization: float = 0.05,
    alpha: float = 2.0,
    test_days: int = 14,
    evaluate: Annotated[bool, typer.Option(help="evaluate on a time split first")] = True,
    activate: Annotated[bool, typer.Option(help="make the new version live")] = True,
    propensity: Annotated[bool, typer.Option(help="train the propensity and value models too")] = True,
) -> None:
    """Train ALS + neighbours + bestsellers (+ propensity models), evaluate, and publish a version to the registry."""
    from engine.registry import Registry
    from engine.rules import RulesError, load_rules
    from training.als import AlsParams
    from training.datafiles import DataError
    from training.evaluate import EvalParams
    from training.train import TrainParams
    from training.train import train as run_train

    settings = get_settings()
    params = TrainParams(
        als=AlsParams(factors=factors, iterations=iterations, regularization=regularization, alpha=alpha),
        evaluation=EvalParams(test_days=test_days),
        evaluate=evaluate,
        propensity=propensity,
    )
    try:
        rules = load_rules(settings.rules_file)
        with progress_bar() as bar:
            task = bar.add_task("training", total=None)
            artifact, metrics = run_train(
                data,
                Registry(settings.registry_path),
                rules,
                params,
                progress=lambda msg: bar.update(task, description=msg),
                activate=activate,
            )
    except (DataError, RulesError) as exc:
        raise _fail(str(exc)) from exc
    console.print(f"published model version [bold]{artifact.version}[/bold] ({'live' if activate else 'not live'})")
    _print_metrics(metrics)


def _print_metrics(metrics: dict[str, Any]) -> None:
    from rich.table import Table

    for section, models in (("discovery", metrics.get("discovery")), ("next_basket", metrics.get("next_basket"))):
        if not isinstance(models, dict):
            continue
        table = Table(title=f"{section} ({models.get('users')} customers, time split)")
        names = [k for k, v in models.items() if isinstance(v, dict)]
        cols = [c for c in (models[names[0]].keys() if names else []) if c.endswith("@10") or c == "recall@20"]
        table.add_column("model")
        for c in cols:
            table.add_column(c, justify="right")
        for n in names:
            table.add_row(n, *(f"{models[n][c]:.4f}" for c in cols))
        console.print(table)
    prop = metrics.get("propensity")
    if isinstance(prop, dict) and "skipped" in prop:
        console.print(f"propensity models skipped: {prop['skipped']}")
    elif isinstance(prop, dict):
        dates = ", ".join(prop.get("as_of", []))
        table = Table(title=f"propensity ({prop.get('examples')} examples as of {dates}; {prop.get('seconds')} s)")
        for col in ("model", "measure", "validation", "baseline"):
            table.add_column(col, justify="left" if col in ("model", "measure") else "right")
        response = prop.get("offer_response") or {}
        if "skipped" in response:
            console.print(f"offer response models skipped: {response['skipped']}")
        for name, m in {**prop.get("models", {}), **response.get("models", {})}.items():
            key = "auc" if m["kind"] == "binary" else "spearman"
            base = list(m["baselines"].values())[-1].get(key)  # the recency table / past spend baseline
            table.add_row(name, key, _fmt(m["model"][key]), _fmt(base))
        console.print(table)
    console.print(f"fit: {metrics.get('fit_seconds')} s, whole job: {metrics.get('train_seconds')} s")


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


@app.command()
def load(
    data: Annotated[Path, typer.Option(help="folder with catalog, customers, events")] = Path("var/shop"),
) -> None:
    """Write customer profiles (with segment and features) and the catalog to Redis (bumps the catalog version)."""
    from feature_store.keys import Keys
    from feature_store.store import RedisStore
    from training.datafiles import DataError, read_shop
    from training.load import catalog_items
    from training.profiles import profiles_for_load

    settings = get_settings()
    try:
        with console.status("reading and validating data"):
            shop = read_shop(data)
        with console.status("computing customer features and segments"):
            profiles = profiles_for_load(shop, data)
    except DataError as exc:
        raise _fail(str(exc)) from exc
    with redis_url(settings) as url:
        store = RedisStore(url, Keys(settings.key_prefix))
        with progress_bar() as bar:
            task = bar.add_task("profiles", total=len(shop.customers))
            n = store.write_profiles(profiles, progress=lambda k: bar.advance(task, k))
        version = store.write_catalog(catalog_items(shop))
        store.record_load(data=str(data), profiles=str(n), catalog_version=str(version))
        mem = store.client.info("memory")["used_memory_human"]
        store.close()
    console.print(f"loaded {n:,} profiles and {len(shop.catalog):,} items (catalog version {version}); redis {mem}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="default: NEXTBEST_HOST or 127.0.0.1")] = None,
    port: Annotated[int | None, typer.Option(help="default: NEXTBEST_PORT or 8000")] = None,
    workers: Annotated[
        int | None, typer.Option(help="uvicorn worker processes (default: NEXTBEST_WORKERS or 2)")
    ] = None,
) -> None:
    """Serve the API (starts the embedded Redis when REDIS_URL is unset)."""
    import uvicorn

    from api.auth import ApiKeysError, parse_keys
    from api.signing import ClickSigner, SigningConfigError
    from engine.registry import Registry
    from engine.rules import RulesError, load_rules

    settings = get_settings()
    n_workers = workers or settings.workers
    try:
        load_rules(settings.rules_file)  # fail here, clearly, rather than in every worker
        keys = parse_keys(settings.api_keys.get_secret_value() if settings.api_keys else None)
        ClickSigner.from_setting(
            settings.email_signing_keys.get_secret_value() if settings.email_signing_keys else None
        )
    except (RulesError, ApiKeysError, SigningConfigError) as exc:
        raise _fail(str(exc)) from exc
    if keys:
        described = ", ".join(f"{k.name} ({'+'.join(sorted(k.scopes))})" for k in keys)
        console.print(f"API keys: {described}")
    else:
        console.print("[yellow]warning:[/yellow] NEXTBEST_API_KEYS is not set: the API is open to every caller")
    if Registry(settings.registry_path).live_version() is None:
        console.print(
            f"[yellow]warning:[/yellow] no live model in {settings.registry_path}; "
            "answers will be bestsellers (fallback) until `nextbest train` publishes one"
        )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One BLAS thread per worker: requests are small matrix products, and threads only fight for the cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    prom = settings.data_dir / f"prometheus-{os.getpid()}"
    # A single uvicorn worker ends its graceful shutdown by raising the signal again, and SIGTERM's default
    # action would then kill this process before the embedded Redis is stopped and the folders removed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with redis_url(settings) as url, contextlib.ExitStack() as cleanup:
        os.environ["REDIS_URL"] = url
        if n_workers > 1:
            # Workers write their metrics to files here; /metrics sums them across workers.
            shutil.rmtree(prom, ignore_errors=True)
            prom.mkdir(parents=True)
            cleanup.callback(shutil.rmtree, prom, ignore_errors=True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom.resolve())
            # Each worker's socket for sharing batch chunks; short (a socket path has a ~100-byte limit).
            peers = Path(tempfile.mkdtemp(prefix="nextbest-peers-"))
            cleanup.callback(shutil.rmtree, peers, ignore_errors=True)
            os.environ["NEXTBEST_PEERS_DIR"] = str(peers)
        if settings.metrics_port:
            from api.metrics import start_metrics_server

            start_metrics_server(settings.metrics_port, host or settings.host)
            console.print(f"metrics on http://{host or settings.host}:{settings.metrics_port}/metrics")
        # Workers read their settings from the environment: what this command was told wins there too.
        os.environ["NEXTBEST_HOST"], os.environ["NEXTBEST_PORT"] = host or settings.host, str(port or settings.port)
        # With one worker uvicorn builds the app in this process: its settings must be read again, not the
        # ones cached above, from before REDIS_URL pointed at the embedded server.
        get_settings.cache_clear()
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            workers=n_workers,
            log_level=settings.log_level,
            access_log=False,
        )


keys_app = typer.Typer(no_args_is_help=True, help="API keys: make one and the line that configures it")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Option(help="who uses the key, e.g. shop-web, esp, etl")],
    scopes: Annotated[str, typer.Option(help="comma-separated: decide, email, ingest, admin")],
) -> None:
    """Print a new random key (give it to the caller) and its NEXTBEST_API_KEYS entry (only its hash)."""
    from api.auth import ApiKeysError, hash_key, new_key, parse_keys

    key = new_key()
    entry = f"{name}:{'+'.join(s.strip() for s in scopes.split(','))}:{hash_key(key)}"
    try:
        parse_keys(entry)
    except ApiKeysError as exc:
        raise _fail(str(exc)) from exc
    # Each on one line however narrow the terminal: both are copied from here.
    console.print(Text.assemble(f"key (give it to {name}; it is not stored anywhere): ", (key, "bold")), soft_wrap=True)
    console.print(Text(f"NEXTBEST_API_KEYS entry (add to the comma-separated list): {entry}"), soft_wrap=True)


@app.command()
def demo(
    customers: int = 20_000,
    items: int = 2_000,
    days: int = 150,  # the propensity models need 30 days of history plus a 90-day label window
    port: int = 8000,
) -> None:
    """Generate a shop, train, load Redis, serve on 127.0.0.1 and show real decisions."""
    from api.demo import port_in_use, run_demo
    from api.readiness import ServerNotReadyError

    if port_in_use(port):
        raise _fail(f"port {port} on 127.0.0.1 is in use (a demo or server still running?): stop it, or pass --port N")
    try:
        run_demo(
            console, customers=customers, items=items, days=days, port=port, generate=generate, train=train, load=load
        )
    except ServerNotReadyError as exc:
        raise _fail(str(exc)) from exc


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: each prints a table and writes a report with plots")
app.add_typer(bench_app, name="bench")
Quick = Annotated[bool, typer.Option(help="a small, CI-sized run")]
OutDir = Annotated[Path, typer.Option(help="where reports go")]
# Benchmarks that define their own commands: each module has `register(bench_app, console)`.
_BENCH_MODULES: tuple[str, ...] = (
    "benchmarks.regret",
    "benchmarks.recs",
    "benchmarks.ope",
    "benchmarks.ltv",
    "benchmarks.soak",
    "benchmarks.offer_models",
    "benchmarks.memory",
)


@bench_app.command("latency")
def bench_latency(
    quick: Quick = False,
    out: OutDir = Path("benchmarks/reports"),
    endpoint: Annotated[
        str, typer.Option(help="recommendations | offers | email | all (every serving benchmark, side by side)")
    ] = "all",
) -> None:
    """Serving latency at fixed arrival rates and the maximum sustained rate."""
    if endpoint == "offers":
        from benchmarks.offers import run_offers_bench

        run_offers_bench(console, quick=quick, out_dir=out)
    elif endpoint == "all":
        from benchmarks.serving import run_serving_bench

        run_serving_bench(console, quick=quick, out_dir=out)
    elif endpoint == "email":
        from benchmarks.email import run_email_latency_bench

        run_email_latency_bench(console, quick=quick, out_dir=out)
    elif endpoint == "recommendations":
        from benchmarks.latency import run_latency_bench

        run_latency_bench(console, quick=quick, out_dir=out)
    else:
        raise _fail(f"unknown endpoint {endpoint!r}; available: recommendations, offers, email, all")


@bench_app.command("email-batch")
def bench_email_batch(
    quick: Quick = False,
    out: OutDir = Path("benchmarks/reports"),
    streams: Annotated[int, typer.Option(min=1, max=16, help="batch requests in flight at once")] = 2,
) -> None:
    """Email pre-send batch: recipients per second for 100k recipients, decided then read back."""
    from benchmarks.email import run_email_batch_bench

    run_email_batch_bench(console, quick=quick, out_dir=out, streams=streams)


@bench_app.command("email-instructions")
def bench_email_instructions(
    quick: Quick = False,
    out: OutDir = Path("benchmarks/reports"),
    recipients: Annotated[int, typer.Option(min=256, max=20_000, help="recipients per phase")] = 1_024,
) -> None:
    """Email pre-send batch: a worker's instructions per recipient, counted by callgrind (needs valgrind):
    unlike times, they do not drift with the machine, so two commits compare."""
    from benchmarks.instructions import InstructionsError, run_email_instructions_bench

    try:
        run_email_instructions_bench(console, quick=quick, out_dir=out, recipients=recipients)
    except InstructionsError as exc:
        raise _fail(str(exc)) from exc


@bench_app.command("ingest")
def bench_ingest(quick: Quick = False, out: OutDir = Path("benchmarks/reports")) -> None:
    """Event ingestion: sustained events/s with nothing lost."""
    from benchmarks.ingest import run_ingest_bench

    run_ingest_bench(console, quick=quick, out_dir=out)


@bench_app.command("overhead")
def bench_overhead(quick: Quick = False, out: OutDir = Path("benchmarks/reports")) -> None:
    """Cost of the decision log and exploration: two servers side by side under one load."""
    from benchmarks.overhead import run_overhead_bench

    run_overhead_bench(console, quick=quick, out_dir=out)


@bench_app.command("all")
def bench_all(quick: Quick = False, out: OutDir = Path("benchmarks/reports"), seed: int = 0) -> None:
    """Every benchmark in turn (quality, LTV, off-policy evaluation, regret, offer models against the truth, memory,
    serving), each with its report."""
    import time

    from benchmarks.ltv import run_ltv_bench
    from benchmarks.memory import run_memory_bench
    from benchmarks.offer_models import run_offer_models_bench
    from benchmarks.ope import run_ope_bench
    from benchmarks.recs import run_recs_bench
    from benchmarks.regret import run_regret_bench
    from benchmarks.serving import run_serving_bench

    done: list[tuple[str, Path, float]] = []
    for name, run in (
        ("recs", functools.partial(run_recs_bench, seed=seed)),
        ("ltv", functools.partial(run_ltv_bench, seed=seed)),
        ("ope", functools.partial(run_ope_bench, seed=seed)),
        ("regret", functools.partial(run_regret_bench, seed=seed)),
        ("offer-models", functools.partial(run_offer_models_bench, seed=seed)),
        ("memory", run_memory_bench),
        ("serving", run_serving_bench),
    ):
        console.rule(f"bench {name}")
        t0 = time.perf_counter()
        path = run(console, quick=quick, out_dir=out)
        done.append((name, path, time.perf_counter() - t0))
    console.rule("reports")
    for name, path, seconds in done:
        console.print(f"{name:>8}: {path}  ({seconds:.0f} s)")


def _register_benchmarks() -> None:
    import importlib

    for module in _BENCH_MODULES:
        importlib.import_module(module).register(bench_app, console)


@registry_app.command("list")
def registry_list() -> None:
    """Versions in the registry, the live one marked."""
    from engine.registry import Registry

    path = get_settings().registry_path
    reg = Registry(path)
    live = reg.live_version()
    versions = reg.versions()
    for v in versions:
        console.print(f"{'*' if v == live else ' '} {v}")
    if not versions:
        console.print(Text(f"no model versions in {path} (`nextbest train` publishes one)"), soft_wrap=True)


@registry_app.command("activate")
def registry_activate(version: str) -> None:
    """Verify a version and make it live (running servers pick it up without restart)."""
    from engine.registry import ArtifactError, Registry

    try:
        Registry(get_settings().registry_path).activate(version)
    except ArtifactError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"live: {version}")


@registry_app.command("prune")
def registry_prune(
    keep: Annotated[int, typer.Option(min=1, help="old versions to keep besides the live one")] = 3,
) -> None:
    """Delete old versions (never the live one) and abandoned staging folders."""
    from engine.registry import Registry

    removed = Registry(get_settings().registry_path).prune(keep)
    console.print(f"removed {len(removed)} version(s): {', '.join(removed) or '-'}")


@log_app.command("export")
def log_export(
    out: Annotated[Path, typer.Option(help="Parquet file to create (must not exist)")],
    max_entries: Annotated[int, typer.Option(min=1, help="at most this many stream entries per file")] = 1_000_000,
) -> None:
    """Drain the decision log into Parquet; entries are acknowledged and removed only once written.

    Safe to interrupt and rerun: every entry ends up in exactly one file.
    """
    from feature_store.keys import Keys
    from feature_store.log_export import ExportError, LogExporter
    from feature_store.store import RedisStore

    settings = get_settings()
    with redis_url(settings) as url:
        store = RedisStore(url, Keys(settings.key_prefix))
        try:
            with console.status("exporting the decision log"):
                result = LogExporter(store.client, store.keys).export(out, max_entries=max_entries)
        except ExportError as exc:
            raise _fail(str(exc)) from exc
        finally:
            store.close()
    if result.recovered:
        console.print(f"completed an interrupted export: {result.recovered:,} entries are in {result.recovered_file}")
    for problem in result.problems:
        console.print(Text.assemble(("skipped", "yellow"), " ", problem), soft_wrap=True)  # quotes a bad entry as it is
    if result.file is None:
        console.print("nothing new to export")
        return
    console.print(
        f"wrote {result.rows:,} rows ({result.decisions:,} decisions, {result.rewards:,} rewards) from "
        f"{result.entries:,} stream entries to {result.file}"
    )


def _wants_benchmarks(args: list[str]) -> bool:
    """Whether the command line asks for `nextbest bench …` (the first word that is not an option)."""
    return next((a for a in args if not a.startswith("-")), None) == "bench"


def main() -> None:
    # The benchmark modules bring scipy, matplotlib and LightGBM (about 3 s and 250 MB): only `bench` needs
    # their commands, so `serve` (a restart), `load` and the rest start without them.
    if _wants_benchmarks(sys.argv[1:]):
        _register_benchmarks()
    try:
        app()
    except SettingsError as exc:  # a bad NEXTBEST_* value: one line naming it, not a traceback
        print_error(console, exc)
        sys.exit(2)
