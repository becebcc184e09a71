"""Benchmark reports: tables, text and PNG figures written as Markdown + JSON, with a record of how the
benchmark ran (command, commit, machine, package versions, datasets with checksums, parameters)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import matplotlib
import numpy as np
import psutil

# Benchmarks run headless (CI, ssh, containers); choose Agg before anything imports pyplot.
matplotlib.use("Agg")

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["Report", "environment", "format_value", "new_figure", "speed_probe_ms"]

_KEY_PACKAGES = (
    "numpy",
    "scipy",
    "pandas",
    "implicit",
    "redis",
    "fastapi",
    "uvicorn",
    "uvloop",
    "onnxruntime",
    "lightgbm",
    "matplotlib",
)
# Values of options like these are replaced on the recorded command line: reports get shared.
_SECRET_OPTION = re.compile(r"^--?[\w-]*(key|token|secret|password|passwd)[\w-]*$", re.IGNORECASE)
_REPO_ROOT = Path(__file__).resolve().parents[1]


def format_value(value: object, precision: int | None = None) -> str:
    """A table cell: floats to 3 significant digits (or `precision` decimals), the rest as str."""
    if value is None:
        return "–"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if not isinstance(value, float | np.floating):
        return str(value)
    x = float(value)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if precision is not None:
        return f"{x:.{precision}f}"
    magnitude = abs(x)
    if magnitude == 0:
        return "0"
    if magnitude >= 1000:
        return f"{x:.0f}"  # rounding 12345 to 12300 would hide real differences between rows
    if magnitude >= 1e-3:
        return f"{x:.{max(0, 2 - math.floor(math.log10(magnitude)))}f}"
    return f"{x:.2e}"


def _param_text(value: object) -> str:
    # Parameters are shown exactly (a learning rate must not be rounded); containers as JSON.
    if isinstance(value, list | tuple | dict | set | frozenset):
        return json.dumps(_jsonable(value))
    return str(value)


def new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Axes]:
    """A figure outside pyplot's global registry, so benchmarks making many plots never leak them."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            # --no-optional-locks: never take index.lock, others may be using the working tree.
            ["git", "--no-optional-locks", *args],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command_line(argv: Sequence[str]) -> str:
    redacted: list[str] = []
    hide_next = False
    for arg in argv:
        name, eq, _ = arg.partition("=")
        if hide_next:
            redacted.append("***")
            hide_next = False
        elif _SECRET_OPTION.match(name):
            redacted.append(f"{name}=***" if eq else arg)
            hide_next = not eq
        else:
            redacted.append(arg)
    return shlex.join(redacted)


PROBE_ITERATIONS = 200_000


def speed_probe_ms() -> float:
    """How fast this machine runs plain Python just now: CPU milliseconds of a fixed loop, median of five.

    A shared or throttled machine drifts: on the 2-core machine the README's figures come from, such a loop
    took twice as long at some hours as at others within one day, and a benchmark's throughput moved with
    it (the email batch: 3,100 to 5,100 recipients/s, same code). The probe is short and the drift comes
    and goes within a run, so it only hints: two reports compare fairly at similar figures, and a report
    whose end figure is far from its start ran while the machine changed speed.
    """
    times = []
    for _ in range(5):
        t0 = time.process_time()
        total = 0
        for i in range(PROBE_ITERATIONS):
            total += i * i
        times.append(time.process_time() - t0)
    return round(sorted(times)[2] * 1000, 1)


def environment(started_at: float | None = None) -> dict[str, object]:
    """How and where this process runs, without the host name: command line, commit, machine, versions.

    started_at is a time.time() value (default: when the process started); wall time runs from it.
    """
    if started_at is None:
        started_at = psutil.Process().create_time()
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions: dict[str, str] = {}
    for name in _KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cores = os.cpu_count() or 0
    return {
        "command": _command_line(sys.argv),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
        "os": platform.platform(),  # system-release-machine; unlike uname() it carries no host name
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "started_utc": dt.datetime.fromtimestamp(started_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_time_s": round(time.time() - started_at, 3),
    }


@dataclass(frozen=True)
class _Table:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]
    note: str
    precision: int | None


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Figure:
    filename: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class _Dataset:
    name: str
    path: str
    size_bytes: int
    sha256: str


@dataclass
class Report:
    """One benchmark's results, in the order they were added, and how they were produced."""

    name: str  # file stem: <name>.md, <name>.json
    title: str
    params: dict[str, object] = field(default_factory=dict)  # parameters, seed, data set
    started_at: float = field(default_factory=time.time)
    speed_at_start_ms: float = field(default_factory=speed_probe_ms)  # see `speed_probe_ms`
    _sections: list[_Table | _Text | _Figure] = field(default_factory=list, init=False, repr=False)
    _datasets: list[_Dataset] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise ValueError(f"report name {self.name!r} must be a plain file stem (letters, digits, _ . -)")

    def add_table(
        self,
        title: str,
        headers: Sequence[str],
        rows: Sequence[Sequence[object]],
        note: str = "",
        *,
        precision: int | None = None,
    ) -> None:
        for k, row in enumerate(rows):
            if len(row) != len(headers):
                raise ValueError(f"table {title!r}: row {k} has {len(row)} cells for {len(headers)} headers")
        self._sections.append(_Table(title, tuple(headers), tuple(tuple(r) for r in rows), note, precision))

    def add_text(self, text: str) -> None:
        self._sections.append(_Text(text))

    def add_figure(self, fig: Figure, filename: str, caption: str) -> None:
        """Render fig now (PNG, written beside the report by write()), so the caller may close or reuse it."""
        if not filename.endswith(".png"):
            filename += ".png"
        if not re.fullmatch(r"[\w.-]+\.png", filename) or filename == f"{self.name}.png":
            raise ValueError(f"figure file name {filename!r} must be a plain name like 'latency_cdf.png'")
        if any(isinstance(s, _Figure) and s.filename == filename for s in self._sections):
            raise ValueError(f"figure file name {filename!r} is already used in this report")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        self._sections.append(_Figure(filename, caption, buf.getvalue()))

    def add_dataset(self, name: str, path: Path) -> None:
        """Record a data file the benchmark read, with its size and SHA-256 (read in 1 MiB blocks)."""
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                size += len(block)
        self._datasets.append(_Dataset(name, str(path), size, digest.hexdigest()))

    def print(self, console: Console | None = None) -> None:
        """The tables and texts on the terminal; figures are only named (they live in the files)."""
        console = console or Console(emoji=False)  # a value like "a:email:b" stays as it is
        console.rule(Text(self.title, style="bold"))
        for section in self._sections:
            if isinstance(section, _Text):
                console.print(section.text, markup=False)
            elif isinstance(section, _Figure):
                console.print(f"figure {section.filename}: {section.caption}", style="dim", markup=False)
            else:
                # Text cells: brackets in values must not be read as rich markup.
                table = Table(title=Text(section.title), caption=Text(section.note) if section.note else None)
                for header in section.headers:
                    table.add_column(header, justify="right")
                for row in section.rows:
                    table.add_row(*(Text(format_value(v, section.precision)) for v in row))
                console.print(table)
        if self.params:
            params = ", ".join(f"{k}={_param_text(v)}" for k, v in self.params.items())
            console.print(params, style="dim", markup=False)

    def write(self, out_dir: Path) -> Path:
        """Write out_dir/<name>.md, <name>.json and the figures; return the Markdown path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        env = environment(self.started_at)
        env["speed_probe_ms"] = {"start": self.speed_at_start_ms, "end": speed_probe_ms()}
        for section in self._sections:
            if isinstance(section, _Figure):
                (out_dir / section.filename).write_bytes(section.png)
        md_path = out_dir / f"{self.name}.md"
        md_path.write_text(self._markdown(env), encoding="utf-8")
        (out_dir / f"{self.name}.json").write_text(
            json.dumps(_jsonable(self._as_dict(env)), indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        return md_path

    def _as_dict(self, env: Mapping[str, object]) -> dict[str, object]:
        return {
            "name": self.name,
            "title": self.title,
            "params": self.params,
            "environment": env,
            "datasets": [vars(d) for d in self._datasets],
            "tables": [
                {"title": t.title, "headers": t.headers, "rows": t.rows, "note": t.note}
                for t in self._sections
                if isinstance(t, _Table)
            ],
            "texts": [s.text for s in self._sections if isinstance(s, _Text)],
            "figures": [{"file": s.filename, "caption": s.caption} for s in self._sections if isinstance(s, _Figure)],
        }

    def _markdown(self, env: Mapping[str, object]) -> str:
        out = [f"# {self.title}", ""]
        for section in self._sections:
            if isinstance(section, _Text):
                out += [section.text, ""]
            elif isinstance(section, _Figure):
                out += [f"![{_cell(section.caption)}]({section.filename})", "", f"*{section.caption}*", ""]
            else:
                out += [f"### {section.title}", ""]
                out += _md_table(section.headers, section.rows, section.precision)
                out += ["", *([f"*{section.note}*", ""] if section.note else [])]
        commit = env.get("git_commit") or "unknown"
        dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
        packages = env.get("packages")
        versions = ", ".join(f"{k} {v}" for k, v in packages.items()) if isinstance(packages, dict) else ""
        out += [
            "## How this was produced",
            "",
            f"- Command: `{env['command']}`",
            f"- Commit: `{commit}`{dirty}",
            f"- Started: {env['started_utc']}; wall time {format_value(env['wall_time_s'])} s",
            f"- Machine: {env['cores']} logical cores ({env['usable_cores']} usable, "
            f"{env['physical_cores']} physical), {env['memory_gib']} GiB RAM, {env['cpu_model']}",
            *_speed_line(env),
            f"- OS: {env['os']}; Python: {env['python']}",
            f"- Packages: {versions}",
            "",
            "### Parameters",
            "",
        ]
        params = [(k, _param_text(v)) for k, v in sorted(self.params.items())]
        out += _md_table(("parameter", "value"), params, None) if params else ["(none)"]
        out += ["", "### Datasets", ""]
        if self._datasets:
            out += _md_table(
                ("name", "path", "bytes", "sha256"),
                [(d.name, d.path, d.size_bytes, f"`{d.sha256}`") for d in self._datasets],
                None,
            )
        else:
            out.append("(none: synthetic or in-memory data only)")
        return "\n".join(out) + "\n"


def _speed_line(env: Mapping[str, object]) -> list[str]:
    probe = env.get("speed_probe_ms")
    if not isinstance(probe, dict):
        return []
    return [
        f"- Machine speed: a fixed Python loop ({PROBE_ITERATIONS:,} iterations) took {probe['start']} ms of CPU at "
        f"the start and {probe['end']} ms at the end (median of five; lower is faster). Shared machines drift: "
        "compare reports at similar figures"
    ]


def _cell(value: object, precision: int | None = None) -> str:
    # A pipe would end the cell and a newline the row.
    text = value if isinstance(value, str) else format_value(value, precision)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(headers: Sequence[object], rows: Sequence[Sequence[object]], precision: int | None) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_cell(v, precision) for v in row) + " |" for row in rows]
    return lines


def _jsonable(value: object) -> object:
    """Plain JSON types: numpy scalars and arrays unwrapped, NaN/inf as null, anything else as str."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return _jsonable(tolist())
    return str(value)
