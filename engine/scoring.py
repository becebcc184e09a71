"""Propensity and value models at serving time: one ONNX Runtime session per model, checked when it is loaded.

The ONNX files come from `training.propensity` (LightGBM converted by onnxmltools with ``zipmap=False``): one
float32 input of shape (n, features); a binary model has a (n, 2) class-probability output, a regression model a
(n, 1) value output. Anything else is refused at load with `ModelFileError`, so a bad file never reaches a request.

A registry version carries its propensity models in a folder (`PROPENSITY_DIR`): `models.json` names the
feature order and each model's kind and label, and `<name>.onnx` holds each model; `load_propensity_models`
loads them all or refuses the folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

ModelKind = Literal["binary", "regression"]
KINDS: tuple[ModelKind, ...] = ("binary", "regression")

# Keys of the ONNX metadata that training writes; checked at load when present.
META_FEATURES = "nextbest.feature_names"
META_KIND = "nextbest.kind"
META_NAME = "nextbest.name"

PROBABILITY_OUTPUT = "probabilities"  # the name onnxmltools gives the (n, 2) output with zipmap=False

PROPENSITY_DIR = "propensity"  # inside a registry version
MODELS_JSON = "models.json"
MODEL_NAME = re.compile(r"[A-Za-z0-9_]+")  # a model name is also its file name: no paths


class ModelFileError(ValueError):
    """A model file that cannot be used: unreadable, corrupt, or not the model the caller asked for."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"model file {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, eq=False)
class ScoringModel:
    """A loaded model; `predict` is safe to call from several threads (ONNX Runtime sessions are)."""

    name: str
    kind: ModelKind
    feature_names: tuple[str, ...]
    session: Any = field(repr=False)  # onnxruntime.InferenceSession
    input_name: str = field(repr=False)
    output_name: str = field(repr=False)

    def predict(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(n, len(feature_names)) features -> (n,) P(label = 1) for a binary model, the value for a regression.

        Features are cast to float32 (what the trees compare in); NaN means missing.
        """
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(
                f"model {self.name!r} takes an array of shape (n, {len(self.feature_names)}), got {x.shape}"
            )
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        return self._run(x).astype(np.float64)

    def _run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The session on a checked (n, features) float32 array: P(label = 1) or the value per row."""
        out = np.asarray(self.session.run([self.output_name], {self.input_name: x})[0])
        return out[:, 1] if self.kind == "binary" else out.reshape(-1)


@dataclass(frozen=True)
class PropensityModels:
    """The propensity and value models of one version, over one feature order."""

    feature_names: tuple[str, ...]
    models: dict[str, ScoringModel]

    def _chosen(self, only: Collection[str] | None) -> list[tuple[str, ScoringModel]]:
        if only is None:
            return list(self.models.items())
        return [(name, model) for name, model in self.models.items() if name in only]

    def predict(
        self,
        features: Sequence[float] | np.ndarray,  # type: ignore[type-arg]
        only: Collection[str] | None = None,
    ) -> dict[str, float]:
        """One customer's features (in `feature_names` order, NaN = missing) -> probability or value per model.

        `only` restricts the answer to those models (names without a model are left out), so a request runs
        the models its offers use, not every model of the version. The float32 row is built once and each
        session runs once on it, without the per-call checks of `ScoringModel.predict`.
        """
        row = np.ascontiguousarray(features, dtype=np.float32)
        if row.shape != (len(self.feature_names),):
            raise ValueError(f"propensity models take one row of {len(self.feature_names)} features, got {row.shape}")
        x = row.reshape(1, -1)
        return {name: float(model._run(x)[0]) for name, model in self._chosen(only)}

    def predict_rows(
        self, rows: Sequence[Sequence[float]], only: Collection[str] | None = None
    ) -> list[dict[str, float]]:
        """`predict` for many customers with the same models: one session run per model."""
        return self.predict_each(rows, [self.models if only is None else only] * len(rows))

    def predict_each(
        self, rows: Sequence[Sequence[float]], wanted: Sequence[Collection[str]]
    ) -> list[dict[str, float]]:
        """`predict` for many customers, each with its own `only`: a model runs once, on the rows that want it.

        An email batch's customers mostly want one cheap model and a few want the large ones; scoring every
        row with every model any of them wants would run the large ones on all. Each row's answer holds
        exactly its wanted models (names without a model are left out), the scores `predict` gives it.
        """
        if len(wanted) != len(rows):
            raise ValueError(
                f"predict_each takes one set of wanted models per row: {len(rows)} rows, {len(wanted)} sets"
            )
        out: list[dict[str, float]] = [{} for _ in rows]
        if not rows:
            return out
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"propensity models take rows of {len(self.feature_names)} features, got {x.shape}")
        for name, model in self.models.items():
            which = [k for k, names in enumerate(wanted) if name in names]
            if not which:
                continue
            part = x if len(which) == len(rows) else x[which]
            for k, score in zip(which, model._run(part).tolist(), strict=True):
                out[k][name] = score
        return out


def load_propensity_models(folder: Path) -> PropensityModels | None:
    """The models described by `<folder>/models.json`; None when the folder has no models.json.

    models.json is ``{"feature_names": [...], "models": {name: {"kind": ..., "label": ...}}}`` and each model
    is `<folder>/<name>.onnx`. Raises ModelFileError, naming the file, when models.json is unreadable or
    malformed or a model file fails `load_scoring_model`.
    """
    folder = Path(folder)
    path = folder / MODELS_JSON
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(path, f"cannot be read ({exc})") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ModelFileError(path, f"is not valid JSON ({exc})") from exc
    names, specs = _check_models_json(path, doc)
    models = {name: load_scoring_model(folder / f"{name}.onnx", name, kind, names) for name, kind in specs.items()}
    return PropensityModels(feature_names=names, models=models)


def _check_models_json(path: Path, doc: object) -> tuple[tuple[str, ...], dict[str, str]]:
    if not isinstance(doc, Mapping):
        raise ModelFileError(path, "is not a JSON object")
    names = doc.get("feature_names")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise ModelFileError(path, "'feature_names' must be a non-empty list of distinct names")
    models = doc.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ModelFileError(path, "'models' must be a non-empty object of model name -> {kind, label}")
    specs: dict[str, str] = {}
    for name, spec in models.items():
        if not MODEL_NAME.fullmatch(name):
            raise ModelFileError(path, f"model name {name!r} must be letters, digits and underscores")
        if not isinstance(spec, Mapping) or spec.get("kind") not in KINDS or not isinstance(spec.get("label"), str):
            raise ModelFileError(path, f"model {name!r} needs a kind in {KINDS} and a label, got {spec!r}")
        specs[name] = spec["kind"]
    return tuple(names), specs


def session_options() -> ort.SessionOptions:
    """One thread, sequential: the session runs on the request path beside an event loop, one to a few
    hundred rows per call, where thread hand-offs cost more than they save."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def load_scoring_model(path: Path, name: str, kind: str, feature_names: Sequence[str]) -> ScoringModel:
    """Open `path` in ONNX Runtime and check it is a `kind` model over exactly `feature_names`.

    Raises ModelFileError (naming the file) when the file is unreadable, does not parse, has the wrong input
    width or outputs, was written for other features, or fails on a test row.
    """
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")
    names = tuple(feature_names)
    if not names:
        raise ValueError("a scoring model needs at least one feature name")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise ModelFileError(path, "is empty")
    try:
        session = ort.InferenceSession(data, sess_options=session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors share no base class but Exception
        raise ModelFileError(path, f"is not a loadable ONNX model ({exc})") from exc

    input_name = _check_input(path, session, len(names))
    output_name = _pick_output(path, session, kind)
    _check_metadata(path, session, name, kind, names)
    model = ScoringModel(
        name=name,
        kind=kind,
        feature_names=names,
        session=session,
        input_name=input_name,
        output_name=output_name,
    )
    _smoke_test(path, model)
    return model


def _check_input(path: Path, session: Any, n_features: int) -> str:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelFileError(path, f"expected one input, found {[i.name for i in inputs]}")
    node = inputs[0]
    if node.type != "tensor(float)":
        raise ModelFileError(path, f"input {node.name!r} is {node.type}, expected tensor(float)")
    shape = list(node.shape)
    if len(shape) != 2 or shape[1] != n_features:
        raise ModelFileError(path, f"input {node.name!r} has shape {shape}, expected [n, {n_features}] features")
    if isinstance(shape[0], int) and shape[0] > 0:
        raise ModelFileError(path, f"input {node.name!r} has a fixed batch size {shape[0]}, expected a free one")
    return str(node.name)


def _pick_output(path: Path, session: Any, kind: ModelKind) -> str:
    outputs = session.get_outputs()
    found = [(o.name, o.type, list(o.shape)) for o in outputs]
    tensors = [o for o in outputs if o.type == "tensor(float)" and len(o.shape) == 2]
    if kind == "binary":
        # A ZipMap output (seq(map(int64,tensor(float)))) means the model was converted with zipmap=True.
        pairs = [o for o in tensors if o.shape[1] == 2]
        named = [o for o in pairs if o.name == PROBABILITY_OUTPUT]
        chosen = named or pairs
        if len(chosen) != 1:
            raise ModelFileError(
                path, f"expected one float output of shape [n, 2] (class probabilities), found {found}"
            )
        return str(chosen[0].name)
    if len(outputs) != 1 or len(tensors) != 1 or tensors[0].shape[1] != 1:
        raise ModelFileError(path, f"expected a single float output of shape [n, 1] (the value), found {found}")
    return str(tensors[0].name)


def _check_metadata(path: Path, session: Any, name: str, kind: str, names: tuple[str, ...]) -> None:
    """Training records the feature order in the file; a file trained on other columns would score garbage."""
    meta: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
    if META_KIND in meta and meta[META_KIND] != kind:
        raise ModelFileError(path, f"was trained as a {meta[META_KIND]} model, asked to load it as {kind}")
    if META_FEATURES in meta:
        try:
            trained = tuple(json.loads(meta[META_FEATURES]))
        except (ValueError, TypeError) as exc:
            raise ModelFileError(path, f"has unreadable {META_FEATURES} metadata") from exc
        if trained != names:
            diff = [f"#{i}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(trained, names, strict=False)) if a != b]
            raise ModelFileError(path, f"was trained on other features than given ({', '.join(diff[:3]) or 'count'})")
    if META_NAME in meta and meta[META_NAME] != name:
        raise ModelFileError(path, f"holds model {meta[META_NAME]!r}, asked to load it as {name!r}")


def _smoke_test(path: Path, model: ScoringModel) -> None:
    """Score two rows of missing values: catches graphs that load but fail or return the wrong shape."""
    probe = np.full((2, len(model.feature_names)), np.nan, dtype=np.float32)
    try:
        out = model.predict(probe)
    except Exception as exc:  # same reason as at session creation
        raise ModelFileError(path, f"fails on a test row ({exc})") from exc
    if out.shape != (2,) or not np.all(np.isfinite(out)):
        raise ModelFileError(path, f"returns {out!r} for a test batch of 2 rows, expected 2 finite numbers")
    if model.kind == "binary" and not np.all((out >= 0.0) & (out <= 1.0)):
        raise ModelFileError(path, f"returns {out!r} as probabilities for a test batch")
