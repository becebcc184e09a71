"""Ranking metrics over recommendation lists against held-out truth sets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(recs: Sequence[str], truth: set[str], k: int) -> float:
    if not truth:
        return 0.0
    return len(set(recs[:k]) & truth) / len(truth)


def ndcg_at_k(recs: Sequence[str], truth: set[str], k: int) -> float:
    if not truth:
        return 0.0
    gains = [1.0 / np.log2(i + 2) for i, r in enumerate(recs[:k]) if r in truth]
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(truth), k)))
    return float(sum(gains) / ideal)


def hit_rate_at_k(recs: Sequence[str], truth: set[str], k: int) -> float:
    return 1.0 if set(recs[:k]) & truth else 0.0


def mean_metrics(lists: Sequence[Sequence[str]], truths: Sequence[set[str]], ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([recall_at_k(r, t, k) for r, t in zip(lists, truths, strict=True)]))
        out[f"ndcg@{k}"] = float(np.mean([ndcg_at_k(r, t, k) for r, t in zip(lists, truths, strict=True)]))
        out[f"hit@{k}"] = float(np.mean([hit_rate_at_k(r, t, k) for r, t in zip(lists, truths, strict=True)]))
    return {k: round(v, 5) for k, v in out.items()}
