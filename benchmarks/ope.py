"""`nextbest bench ope`: off-policy evaluation of a target policy from a decision log, and its validation.

With no input it validates the estimators on a synthetic shop with known truth (`benchmarks/ope_sim.py`).
With `--log F.parquet` (`nextbest log export`) it estimates the logged shadow policy's value per placement;
with `--file F.csv|parquet` it reads any logged-bandit-feedback file (columns in `read_feedback_file`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import typer
from rich.console import Console

from api.console import print_error
from benchmarks import ope_sim
from benchmarks.report import Report, new_figure
from engine import ope
from engine.rules import EpsilonGreedy, Exploration, Greedy, Softmax, Thompson
from training.datafiles import DataError

DEFAULT_TARGETS = ("greedy", "softmax:0.1", "epsilon:0.1", "thompson")
FULL = ope_sim.SimSpec(customers=3000, items=300, decisions=3000, runs=100)
QUICK = ope_sim.SimSpec(customers=800, items=200, decisions=800, runs=20)
RIDGE = 1e-3
ACTION_SMOOTHING = 10.0  # pseudo-rows pulling a rarely shown action's offset to 0
LIFT_PRIOR = 1.0  # pseudo-rewards pulling a rarely shown item's lift to 1


def parse_policy(text: str) -> Exploration:
    """`greedy`, `epsilon:0.1`, `softmax:0.05`, `thompson` or `thompson:<prior_strength>`."""
    name, _, arg = text.strip().partition(":")
    try:
        if name == "greedy" and not arg:
            return Greedy()
        if name in ("epsilon", "epsilon_greedy"):
            return EpsilonGreedy(epsilon=float(arg or 0.1))
        if name == "softmax":
            return Softmax(temperature=float(arg or 0.1))
        if name == "thompson":
            return Thompson(prior_strength=float(arg)) if arg else Thompson()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"bad policy {text!r}: {exc}") from exc
    raise ValueError(f"unknown policy {text!r}; use greedy, epsilon:E, softmax:T, thompson[:prior_strength]")


# ---------------------------------------------------------------------------------------------- input files


def _read(path: Path) -> tuple[pd.DataFrame, int]:
    """The file as strings/numbers and the offset from a 0-based row to its reported line (CSV) or row."""
    if not path.exists():
        raise DataError(path, None, None, "no such file")
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pandas(), 1
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(path, None, None, f"cannot be read as Parquet: {exc}") from exc
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True), 2
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, None, None, f"cannot be parsed as CSV: {exc}") from exc


def _number(
    df: pd.DataFrame,
    col: str,
    path: Path,
    lines: int | ope.IntArray,
    *,
    low: float,
    high: float,
    low_open: bool = False,
) -> ope.FloatArray:
    """Column `col` as floats; the first bad value raises with its line (`lines`: offset, or a line per row)."""
    raw = df[col]
    values = pd.to_numeric(raw.astype(str).str.strip() if raw.dtype == object else raw, errors="coerce")
    x = values.to_numpy(dtype=np.float64, na_value=np.nan)
    too_low = x <= low if low_open else x < low
    bad = ~np.isfinite(x) | too_low | (x > high)
    if bad.any():
        r = int(np.argmax(bad))
        shown = str(raw.iloc[r])[:40]
        what = (
            "not a finite number" if not np.isfinite(x[r]) else f"outside {'(' if low_open else '['}{low:g}, {high:g}]"
        )
        line = r + lines if isinstance(lines, int) else int(lines[r])
        raise DataError(path, line, col, f"{what}: {shown!r}", more=int(bad.sum()) - 1)
    return np.asarray(x, dtype=np.float64)


def _require(df: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    for col in columns:
        if col not in df.columns:
            raise DataError(path, 1, col, f"required column missing (have: {', '.join(map(str, df.columns))})")


@dataclass(frozen=True)
class Feedback:
    """One group of logged rows ready for the estimators (the reward model already applied, when possible)."""

    label: str
    log: ope.SlateLog
    weighting: ope.Weighting
    has_model: bool
    rows: int
    note: str


def read_feedback_file(path: Path, target_file: Path | None, weighting: ope.Weighting) -> Feedback:
    """A generic logged-bandit-feedback file (CSV or Parquet), one row per shown action:

    `context_*` numeric features (any number, may be none), `action` (an id), `position` (1-based, default 1),
    `reward` (a number), `logging_probability` (in (0, 1]), optional `decision_id` (rows sharing it are one
    slate; default: each row is its own decision) and `target_probability` (in [0, 1]). Instead of the last,
    `target_file` gives the target's distribution per logged row in long form: `row` (1-based data row of
    `path`), `action`, `probability`; it also enables DM and DR. Probabilities are per (item, position).
    """
    df, offset = _read(path)
    _require(df, path, ("action", "reward", "logging_probability"))
    if len(df) == 0:
        raise DataError(path, None, None, "no data rows")
    contexts = sorted(c for c in df.columns if str(c).startswith("context_"))
    features = [_number(df, c, path, offset, low=-math.inf, high=math.inf) for c in contexts]
    x = np.column_stack(features) if features else np.zeros((len(df), 0))
    reward = _number(df, "reward", path, offset, low=-math.inf, high=math.inf)
    logging = _number(df, "logging_probability", path, offset, low=0.0, high=1.0, low_open=True)
    position = np.ones(len(df), dtype=np.int64)
    if "position" in df.columns:
        pos = _number(df, "position", path, offset, low=1, high=10_000)
        if (pos != np.round(pos)).any():
            r = int(np.argmax(pos != np.round(pos)))
            raise DataError(path, r + offset, "position", f"not a whole number: {df['position'].iloc[r]!r}")
        position = pos.astype(np.int64)
    action = df["action"].astype(str).str.strip().to_numpy()
    if (action == "").any():
        raise DataError(path, int(np.argmax(action == "")) + offset, "action", "empty value")
    decision: Any = df["decision_id"].astype(str).to_numpy() if "decision_id" in df.columns else np.arange(len(df))
    key = pd.Series(list(zip(decision.tolist(), position.tolist(), strict=True)))
    if key.duplicated().any():
        r = int(np.argmax(key.duplicated().to_numpy()))
        raise DataError(path, r + offset, "position", f"decision {decision[r]!r} has position {position[r]} twice")
    if target_file is not None and "target_probability" in df.columns:
        raise DataError(target_file, None, None, f"{path} has a target_probability column already; give one of them")
    if target_file is None and "target_probability" not in df.columns:
        raise DataError(path, 1, "target_probability", "required column missing (or pass --target-file)")
    fold = _folds(decision)
    actions, action_code = np.unique(action, return_inverse=True)
    q_logged = np.zeros(len(df))
    target_hat: ope.FloatArray | None = None
    if target_file is None:
        target = _number(df, "target_probability", path, offset, low=0.0, high=1.0)
        note = "target probabilities from the file's target_probability column; DM and DR need --target-file"
    else:
        t_row, t_action, t_prob = _read_target_file(target_file, len(df))
        code_of = {a: i for i, a in enumerate(actions.tolist())}
        t_code = np.asarray([code_of.get(a, -1) for a in t_action.tolist()], dtype=np.int64)
        target = np.zeros(len(df))
        hit = t_code == action_code[t_row]
        target[t_row[hit]] = t_prob[hit]
        lin, offsets = _linear_model(x, position, reward, action_code, len(actions), fold)
        q_logged = lin + offsets[fold, action_code]
        known = np.where(t_code >= 0, offsets[fold[t_row], np.maximum(t_code, 0)], 0.0)
        target_hat = np.asarray(np.bincount(t_row, t_prob * (lin[t_row] + known), len(df)), dtype=np.float64)
        note = "target distributions from --target-file; reward model: ridge on context_* and position + action offsets"
    model = target_hat is not None
    log = ope.SlateLog.from_rows(decision, position, reward, logging, target, q_logged if model else None, target_hat)
    return Feedback(path.name, log, weighting, model, len(df), note)


def _read_target_file(path: Path, n_rows: int) -> tuple[ope.IntArray, np.ndarray, ope.FloatArray]:  # type: ignore[type-arg]
    df, offset = _read(path)
    _require(df, path, ("row", "action", "probability"))
    row = _number(df, "row", path, offset, low=1, high=n_rows)
    if (row != np.round(row)).any():
        r = int(np.argmax(row != np.round(row)))
        raise DataError(path, r + offset, "row", f"not a whole number: {df['row'].iloc[r]!r}")
    prob = _number(df, "probability", path, offset, low=0.0, high=1.0)
    rows = row.astype(np.int64) - 1
    action = df["action"].astype(str).str.strip().to_numpy()
    dup = pd.Series(list(zip(rows.tolist(), action.tolist(), strict=True))).duplicated().to_numpy()
    if dup.any():
        r = int(np.argmax(dup))
        raise DataError(path, r + offset, "action", f"action {action[r]!r} listed twice for row {rows[r] + 1}")
    total = np.bincount(rows, weights=prob, minlength=n_rows)
    if (total > 1 + 1e-6).any():
        bad_row = int(np.argmax(total > 1 + 1e-6))
        r = int(np.argmax(rows == bad_row))
        raise DataError(
            path, r + offset, "probability", f"row {bad_row + 1}'s probabilities sum to {total[bad_row]:.6g}"
        )
    return rows, action, prob


def _folds(decision: np.ndarray) -> ope.IntArray:  # type: ignore[type-arg]
    """Two folds by decision (deterministic), for cross-fitting the reward model."""
    _, code = np.unique(decision, return_inverse=True)
    return np.asarray(np.random.default_rng(0).permutation(int(code.max()) + 1)[code] % 2, dtype=np.int64)


def _linear_model(
    x: ope.FloatArray,
    position: ope.IntArray,
    reward: ope.FloatArray,
    action: ope.IntArray,
    n_actions: int,
    fold: ope.IntArray,
) -> tuple[ope.FloatArray, ope.FloatArray]:
    """Cross-fitted q̂ = ridge(context_*, position one-hot) + a smoothed per-action offset.

    Returns the linear part per row (fitted on the other fold) and the offsets per (fold, action).
    """
    k = int(position.max())
    design = np.column_stack([x, np.eye(k)[position - 1]])
    lin = np.empty(len(reward))
    offsets = np.zeros((2, n_actions))
    for f in (0, 1):
        train = fold != f
        if not train.any():
            train = np.ones_like(train)
        a = design[train]
        coef = np.linalg.solve(a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ reward[train])
        lin[fold == f] = design[fold == f] @ coef
        resid = reward[train] - a @ coef
        sums = np.bincount(action[train], weights=resid, minlength=n_actions)
        offsets[f] = sums / (np.bincount(action[train], minlength=n_actions) + ACTION_SMOOTHING)
    return lin, offsets


def read_decision_log(path: Path, reward_type: str) -> list[Feedback]:
    """`nextbest log export` Parquet → one Feedback per (placement, live policy, shadow policy).

    Only the shadow policy can be evaluated: its per-slot probabilities of the shown items were computed at
    decision time over the whole candidate pool, while the export keeps the scores of the shown items only,
    so no other policy's probabilities can be recomputed from it. Weights are cascade products of the logged
    per-slot conditionals. DM and DR use the shadow's own logged slate (a draw from the target itself) with a
    reward model of (placement, position, item), cross-fitted by decision.
    """
    df, offset = _read(path)
    _require(df, path, ("kind", "decision_id", "position", "action", "propensity", "target_propensity", "reward"))
    for col in ("placement", "policy", "target_policy", "reward_type"):
        if col not in df.columns:
            df[col] = None
    kind = df["kind"].astype(str)
    shown = df[(kind == "decision") & df["target_propensity"].notna()].copy()
    if shown.empty:
        raise DataError(path, None, "target_propensity", "no shown action has a shadow policy's probability")
    index = shown.index.to_numpy()
    lines = index + offset
    sub = shown.reset_index(drop=True)
    _number(sub, "position", path, lines, low=1, high=10_000)
    _number(sub, "propensity", path, lines, low=0.0, high=1.0, low_open=True)
    _number(sub, "target_propensity", path, lines, low=0.0, high=1.0)
    rewards = df[(kind == "reward") & (df["reward_type"].astype(str) == reward_type)]
    got = rewards.groupby(["decision_id", "action"])["reward"].sum()
    shown = shown.join(got.rename("reward_got"), on=["decision_id", "action"])
    shown["reward_got"] = shown["reward_got"].fillna(0.0)
    shadow = df[kind == "shadow"]
    out = []
    for (placement, live, target), group in shown.groupby(["placement", "policy", "target_policy"], dropna=False):
        g = group.sort_values(["decision_id", "position"])
        fold = _folds(g["decision_id"].to_numpy())
        q_hat = _position_item_model(g, fold)
        decision_fold = dict(zip(g["decision_id"].tolist(), fold.tolist(), strict=True))
        s = shadow[shadow["decision_id"].isin(decision_fold)]
        s_fold = s["decision_id"].map(decision_fold).to_numpy(dtype=np.int64)
        s_hat = q_hat(s["action"].astype(str).to_numpy(), s["position"].to_numpy(dtype=np.int64), s_fold)
        own = pd.Series(s_hat, index=pd.MultiIndex.from_arrays([s["decision_id"], s["position"]]))
        target_hat = own.reindex(pd.MultiIndex.from_arrays([g["decision_id"], g["position"]])).to_numpy()
        has_model = bool(np.isfinite(target_hat).all())
        pos = g["position"].to_numpy(dtype=np.int64)
        log = ope.SlateLog.from_rows(
            g["decision_id"].to_numpy(),
            pos,
            g["reward_got"].to_numpy(dtype=np.float64),
            g["propensity"].to_numpy(dtype=np.float64),
            g["target_propensity"].to_numpy(dtype=np.float64),
            q_hat(g["action"].astype(str).to_numpy(), pos, fold) if has_model else None,
            target_hat if has_model else None,
        )
        note = f"reward = sum of '{reward_type}' rewards per shown action"
        if not has_model:
            note += "; DM/DR skipped: some decisions lack the shadow's own action at a shown position"
        out.append(Feedback(f"{placement}: {live} → {target}", log, "cascade", has_model, len(g), note))
    return out


def _position_item_model(
    g: pd.DataFrame, fold: ope.IntArray
) -> Callable[[Any, ope.IntArray, ope.IntArray], ope.FloatArray]:
    """q̂(item, position) = the position's reward rate × the item's smoothed lift, fitted on the other fold."""
    pos = g["position"].to_numpy(dtype=np.int64)
    reward = g["reward_got"].to_numpy(dtype=np.float64)
    items, code = np.unique(g["action"].astype(str).to_numpy(), return_inverse=True)
    k = int(pos.max())
    base = np.zeros((2, k + 1))
    lift = np.ones((2, len(items)))
    for f in (0, 1):
        train = fold != f if (fold != f).any() else np.ones(len(fold), dtype=np.bool_)
        n_pos = np.bincount(pos[train], minlength=k + 1)
        base[f] = np.bincount(pos[train], weights=reward[train], minlength=k + 1) / np.maximum(n_pos, 1)
        expected = np.bincount(code[train], weights=base[f][pos[train]], minlength=len(items))
        got = np.bincount(code[train], weights=reward[train], minlength=len(items))
        lift[f] = (got + LIFT_PRIOR) / (expected + LIFT_PRIOR)
    index = {a: i for i, a in enumerate(items.tolist())}

    def predict(actions: Any, positions: ope.IntArray, folds: ope.IntArray) -> ope.FloatArray:
        c = np.asarray([index.get(a, -1) for a in actions.tolist()], dtype=np.int64)
        p = np.clip(positions, 0, k)
        return np.asarray(np.where(c >= 0, lift[folds, np.maximum(c, 0)], 1.0) * base[folds, p], dtype=np.float64)

    return predict


# ---------------------------------------------------------------------------------------------- the bench


def _estimators(weighting: ope.Weighting, max_weight: float | None, model: bool) -> list[ope._Estimator]:
    out: list[ope._Estimator] = [
        ope.InverseProbabilityWeighting(weighting, max_weight),
        ope.SelfNormalizedInverseProbabilityWeighting(weighting, max_weight),
    ]
    if model:
        out += [ope.DirectMethod(), ope.DoublyRobust(weighting, max_weight)]
    return out


def _data_report(report: Report, groups: list[Feedback], max_weight: float | None, seed: int) -> None:
    rows: list[list[object]] = []
    fig, ax = new_figure(8.0, 1.2 + 0.45 * len(groups) * 4)
    labels: list[str] = []
    for g in groups:
        w = ope.importance_weights(g.log, g.weighting, max_weight)[g.log.shown]
        ess = float(w.sum() ** 2 / (w**2).sum()) if (w > 0).any() else 0.0
        on_policy = float(g.log.reward.sum() / g.log.n_decisions)
        for est in _estimators(g.weighting, max_weight, g.has_model):
            ci = est.estimate_interval(g.log, method="bootstrap", n_bootstrap=1000, seed=seed)
            normal = est.estimate_interval(g.log)
            rows.append(
                [g.label, est.name, getattr(est, "weighting", None), round(ci.estimate, 5), round(normal.low, 5),
                 round(normal.high, 5), round(ci.low, 5), round(ci.high, 5), g.log.n_decisions, g.rows,
                 round(on_policy, 5), round(float(w.max()), 2), round(ess, 1)]
            )  # fmt: skip
            labels.append(f"{g.label} {est.name}")
            y = len(labels)
            ax.errorbar([ci.estimate], [y], xerr=[[ci.estimate - ci.low], [ci.high - ci.estimate]], fmt="o", capsize=3)
        ax.axvline(on_policy, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.set_xlabel("estimated reward per decision (95 % bootstrap CI); dotted: the logging policy's own mean")
    report.add_table(
        "Estimated value of the target policy",
        ["data", "estimator", "weights", "estimate", "normal low", "normal high", "bootstrap low", "bootstrap high",
         "decisions", "rows", "logged mean", "max weight", "ESS"],
        rows,
        note="value = expected total reward per decision; intervals 95 %: normal approximation over decisions and "
        "a percentile bootstrap of decisions (1,000 resamples). ESS = (Σw)²/Σw², Kish's effective sample size of "
        "the shown rows' weights." + (f" Weights clipped at {max_weight:g}." if max_weight else ""),
    )  # fmt: skip
    for g in groups:
        report.add_text(f"{g.label}: {g.note}.")
    report.add_figure(fig, "ope_estimates.png", "Estimates with 95 % bootstrap intervals")


def run_ope_bench(
    console: Console,
    *,
    quick: bool,
    out_dir: Path,
    seed: int = 0,
    log: Path | None = None,
    file: Path | None = None,
    target_file: Path | None = None,
    targets: tuple[str, ...] = (),
    logging: str = "softmax:0.3",
    runs: int | None = None,
    shop: Path | None = None,
    reward_type: str = "click",
    weighting: ope.Weighting = "item_position",
    max_weight: float | None = None,
) -> Path:
    """Estimate a target policy's value from `log` or `file`; with neither, validate the estimators."""
    if log is not None and file is not None:
        raise ValueError("give --log or --file, not both")
    if (log is not None or file is not None) and targets:
        raise ValueError(
            "--target applies to the synthetic validation only: a decision log keeps the scores of the shown items, "
            "not of the whole candidate pool, so a policy's probabilities cannot be recomputed from it. Evaluate a "
            "policy by making it the placement's `shadow` (its probabilities are logged), or pass a file with "
            "target probabilities (--file with target_probability, or --target-file)"
        )
    if target_file is not None and file is None:
        raise ValueError("--target-file goes with --file")
    if log is not None or file is not None:
        source = log if log is not None else file
        assert source is not None
        report = Report(
            name=f"ope-{source.stem}",
            title=f"Off-policy evaluation of {source.name}",
            params={"seed": seed, "reward_type": reward_type, "max_weight": max_weight, "weighting": weighting},
        )
        report.add_dataset(source.name, source)
        if target_file is not None:
            report.add_dataset(target_file.name, target_file)
        with console.status(f"reading {source}"):
            groups = read_decision_log(source, reward_type) if log is not None else [
                read_feedback_file(source, target_file, weighting)
            ]  # fmt: skip
        _data_report(report, groups, max_weight, seed)
    else:
        base = QUICK if quick else FULL
        names = targets or DEFAULT_TARGETS
        spec = ope_sim.SimSpec(
            base.customers, base.items, base.decisions, runs or base.runs, base.pool, base.slots, base.model_noise,
            base.days, parse_policy(logging), tuple((t, parse_policy(t)) for t in names),
        )  # fmt: skip
        report = Report(
            name="ope-quick" if quick else "ope",
            title="Off-policy estimators against the synthetic shop's known truth",
            params={
                "seed": seed, "customers": spec.customers, "items": spec.items, "decisions_per_run": spec.decisions,
                "runs": spec.runs, "pool": spec.pool, "slots": spec.slots, "model_noise": spec.model_noise,
                "logging": logging, "targets": list(names), "shop": str(shop) if shop else "generated",
            },
        )  # fmt: skip
        if shop is not None:
            report.add_dataset("truth.npz", shop / "truth.npz")
        result = ope_sim.run_simulation(spec, seed, console, shop)
        ope_sim.add_to_report(report, spec, result)
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path


def register(bench_app: typer.Typer, console: Console) -> None:
    @bench_app.command("ope")
    def bench_ope(
        log: Annotated[Path | None, typer.Option(help="a decision-log export (nextbest log export)")] = None,
        file: Annotated[Path | None, typer.Option(help="logged bandit feedback, CSV or Parquet")] = None,
        target_file: Annotated[Path | None, typer.Option(help="target probabilities per row of --file")] = None,
        target: Annotated[
            list[str] | None, typer.Option(help="synthetic validation: greedy | epsilon:E | softmax:T | thompson")
        ] = None,
        logging: Annotated[str, typer.Option(help="synthetic validation: the logging policy")] = "softmax:0.3",
        runs: Annotated[int | None, typer.Option(min=2, help="synthetic runs (default 100, quick 20)")] = None,
        shop: Annotated[Path | None, typer.Option(help="use this generated shop's truth (nextbest generate)")] = None,
        reward_type: Annotated[str, typer.Option(help="--log: click | add_to_cart | purchase | value")] = "click",
        weighting: Annotated[str, typer.Option(help="--file: item_position | cascade")] = "item_position",
        max_weight: Annotated[float | None, typer.Option(min=0, help="clip importance weights at this value")] = None,
        quick: Annotated[bool, typer.Option(help="a small, CI-sized run")] = False,
        seed: int = 0,
        out: Annotated[Path, typer.Option(help="where reports go")] = Path("benchmarks/reports"),
    ) -> None:
        """Off-policy evaluation (IPS, SNIPS, DM, DR) of a log, or the estimators' validation on a synthetic shop."""
        if weighting not in ope.WEIGHTINGS:
            print_error(console, f"--weighting must be one of {', '.join(ope.WEIGHTINGS)}")
            raise typer.Exit(code=2)
        try:
            run_ope_bench(
                console, quick=quick, out_dir=out, seed=seed, log=log, file=file, target_file=target_file,
                targets=tuple(target or ()), logging=logging, runs=runs, shop=shop, reward_type=reward_type,
                weighting=weighting, max_weight=max_weight,  # type: ignore[arg-type]
            )  # fmt: skip
        except (DataError, ValueError) as exc:
            print_error(console, exc)
            raise typer.Exit(code=2) from exc
