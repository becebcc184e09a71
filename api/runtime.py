"""The serving process's live state: store client, circuit breaker, and the swapped ServingState.

Models and catalog are refreshed in the background (registry LIVE pointer, catalog version key);
a version that fails verification is refused and the previous one keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hashlib
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from api import metrics
from api.email import EmailSlots
from api.email_render import EmailRenderer
from api.peers import Peers
from api.settings import Settings
from api.signing import ClickSigner
from engine.catalog import CatalogState
from engine.pipeline import Request, recommend
from engine.policies import Arms
from engine.recmodel import RecModel, load_rec_model
from engine.registry import ArtifactError, Registry
from engine.rules import DEFAULT_RULES_FILE, Rules, RulesError, load_rules, parse_rules
from engine.state import ServingState, build_state
from engine.types import Context, Decision, Profile
from feature_store.breaker import CircuitBreaker
from feature_store.catalog_updates import CatalogWriter, UpsertResult, read_delta
from feature_store.cluster import connect
from feature_store.consent import set_consent
from feature_store.decision_log import DecisionLog, FeedbackResult, arms_arrays, decision_entry
from feature_store.erasure import erase_customer
from feature_store.ingest import EventWriter, LiveEvent
from feature_store.keys import Keys
from feature_store.profiles import ProfileDecodeError
from feature_store.resp import RedisClient, RespConnectionError, RespError
from feature_store.store import AsyncRedisStore, StoreUnavailableError

log = logging.getLogger("nextbest")


@dataclass
class RefreshStatus:
    model_version: str | None = None
    model_error: str | None = None
    refused_version: str | None = None
    catalog_version: str | None = None
    catalog_source: str = "none"  # redis | model_snapshot | none
    rules_error: str | None = None  # why the rules file on disk is not the one being served
    last_refresh: float = 0.0


class Runtime:
    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.rules_path = settings.rules_file or DEFAULT_RULES_FILE
        self.rules: Rules = load_rules(self.rules_path)
        self.config_version = hashlib.sha256(self.rules_path.read_bytes()).hexdigest()[:12]
        self.registry = Registry(settings.registry_path)
        self.store = AsyncRedisStore(redis_url, Keys(settings.key_prefix), timeout_s=settings.redis_timeout_ms / 1000.0)
        # Background refreshes get their own client and a patient timeout: a slow catalog read must
        # neither fail on the request budget nor trip the request path's circuit breaker.
        self.background_store = AsyncRedisStore(redis_url, Keys(settings.key_prefix), timeout_s=1.0)
        # Writes get a longer budget than reads: a slow write is better than a lost event.
        self.ingest_client = connect(redis_url, timeout_s=max(settings.redis_timeout_ms / 1000.0, 0.5))
        # Cap reservations on the request path: a write, so more patient than a read, but bounded.
        self.caps_client = connect(redis_url, timeout_s=settings.caps_timeout_ms / 1000.0)
        self.event_writer = EventWriter(self.ingest_client, Keys(settings.key_prefix))
        self.catalog_writer = CatalogWriter(self.ingest_client, Keys(settings.key_prefix))
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self.status = RefreshStatus()
        self.model: RecModel | None = None
        self.catalog: CatalogState | None = None
        self.state: ServingState | None = None
        self._task: asyncio.Task[None] | None = None
        self._gc_threshold: tuple[int, ...] | None = None  # the collector's thresholds before `start`
        self.keys = Keys(settings.key_prefix)
        self._catalog_version = 0
        self._catalog_lock = asyncio.Lock()
        # Decisions are logged on the request path's connection; a failed write never fails a decision.
        self.decision_log = DecisionLog(
            self.store.client,
            self.keys,
            max_entries=settings.log_max_entries,
            feedback_window_s=settings.feedback_window_s,
        )
        self.feedback_log = DecisionLog(
            self.ingest_client,
            self.keys,
            max_entries=settings.log_max_entries,
            feedback_window_s=settings.feedback_window_s,
        )
        # Bandit state per placement (impressions, successes), re-read from Redis on every refresh.
        self._arm_counts: dict[str, tuple[list[bytes], list[bytes], list[bytes]]] = {}
        self._arms_read_at = 0.0
        self._item_index: tuple[CatalogState | None, dict[bytes, int]] = (None, {})
        self.arms: dict[str, Arms] = {}
        # Impressions counted since the last refresh, added to the shared state then (see add_impressions).
        self._impressions: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._expected: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._log_writes: set[asyncio.Task[None]] = set()
        # Email connected content: stored per (campaign, customer), click links signed with rotating keys.
        keys_setting = settings.email_signing_keys.get_secret_value() if settings.email_signing_keys else None
        self.email_signer = ClickSigner.from_setting(keys_setting)
        self.email = EmailSlots(self)
        self.email_renderer = EmailRenderer(self.email_signer, settings.click_base_url)
        # The other workers of this server, which decide some of the chunks of a pre-send batch.
        self.peers: Peers | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        # Python's collector runs a young collection every 700 net new objects; a batch chunk keeps hundreds of
        # recipients' objects alive for a few milliseconds, so each was walked by several young collections and
        # promoted before it died (17-25 µs of CPU per recipient, pauses up to 6-10 ms). With a larger first
        # threshold most of them die unscanned. Process-wide: restored by `stop`.
        self._gc_threshold = gc.get_threshold()
        gc.set_threshold(self.settings.gc_young_objects, *self._gc_threshold[1:])
        await self._open_connections()
        if self.email_signer.ephemeral:
            await self._shared_signing_key()
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="nextbest-refresh")
        if self.settings.peers_dir is not None:
            await self._start_peers(self.settings.peers_dir)

    async def _open_connections(self) -> None:
        """Connect every client now, not on first use: a first use can come while this worker's loop is busy
        (a batch's chunks), and a connect that misses its budget that way fails its commands, a decision log
        write among them. Redis down at start only delays it: a client connects on its next use."""
        clients = {
            "request": self.store.client,
            "background": self.background_store.client,
            "ingest": self.ingest_client,
            "caps": self.caps_client,
        }
        replies = await asyncio.gather(*(c.execute("PING") for c in clients.values()), return_exceptions=True)
        for name, reply in zip(clients, replies, strict=True):
            if isinstance(reply, Exception):
                log.warning("Redis connection %r not opened at start (%s); it is tried again on first use", name, reply)

    async def _start_peers(self, directory: Path) -> None:
        from api.email_batch import chunk_lines  # it imports this module

        peers = Peers(directory, lambda job: chunk_lines(self, job))
        try:
            await peers.start()
        except OSError as exc:  # e.g. a socket path over the system's limit: batches are then decided here
            log.warning("batch chunks are not shared with the other workers: %s: %s", peers.path, exc)
            return
        self.peers = peers

    async def stop(self) -> None:
        if self.peers is not None:
            await self.peers.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.log_writes_checked()
        await self._flush_impressions()
        await self.store.close()
        await self.background_store.close()
        await self.ingest_client.close()
        await self.caps_client.close()
        # What refresh froze can be collected again (the process's last collection, or the next runtime's):
        # frozen objects are never freed, and extensions such as DuckDB's then report them leaked at exit.
        gc.unfreeze()
        if self._gc_threshold is not None:
            gc.set_threshold(*self._gc_threshold)
            self._gc_threshold = None

    async def _shared_signing_key(self) -> None:
        """Without configured keys, one random key kept in Redis, so every worker and replica verifies the
        links of the others. Configure NEXTBEST_EMAIL_SIGNING_KEYS for production: then Redis holds no key."""
        key = self.keys.email_signing_key
        try:
            _, secret = await self.ingest_client.pipeline([("SET", key, secrets.token_urlsafe(32), "NX"), ("GET", key)])
            self.email_signer = ClickSigner([("r1", bytes(secret))], ephemeral=True)
            log.warning(
                "NEXTBEST_EMAIL_SIGNING_KEYS is not set: email click links are signed with a random key kept in "
                "Redis (%s); fine for a demo, configure keys for real emails",
                key,
            )
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            log.warning(
                "NEXTBEST_EMAIL_SIGNING_KEYS is not set and Redis is unavailable (%s): email click links "
                "are signed with a key of this process only",
                exc,
            )
        self.email_renderer = EmailRenderer(self.email_signer, self.settings.click_base_url)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:  # the loop must survive anything; the error is logged and counted
                log.exception("background refresh failed")

    # ---- refresh ---------------------------------------------------------------------------------
    async def refresh(self) -> None:
        rules_changed = await asyncio.to_thread(self._refresh_rules)
        changed = await asyncio.to_thread(self._refresh_model) or rules_changed
        changed = await self._refresh_catalog() or changed
        if changed or self.state is None:
            # Building arrays for a large catalog takes a while: keep it off the event loop.
            await asyncio.to_thread(self._rebuild)
            # Long-lived model and catalog objects go to the permanent generation, so full garbage
            # collections (a latency spike on the request path) stop walking them.
            gc.freeze()
        await self.refresh_arms()
        self.status.last_refresh = time.time()

    def bandit_placements(self) -> list[str]:
        """Placements whose live or shadow policy learns from feedback (Thompson sampling)."""
        learning = ("thompson", "thompson_lift")
        return [
            name
            for name, p in self.rules.placements.items()
            if p.exploration.policy in learning or (p.shadow is not None and p.shadow.policy in learning)
        ]

    async def refresh_arms(self) -> None:
        """Add this worker's impressions to the shared bandit state, and re-read it when due.

        Reading a placement's whole state (an entry per item) is the expensive half, for Redis and for
        the event loop, so it happens every `arms_refresh_s` rather than on every refresh.
        """
        if not self.settings.exploration:
            return
        await self._flush_impressions()
        if time.monotonic() - self._arms_read_at < self.settings.arms_refresh_s:
            return
        self._arms_read_at = time.monotonic()
        try:
            for placement in self.bandit_placements():
                self._arm_counts[placement] = await self.feedback_log.read_arms(placement)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("arms").inc()
            log.warning("bandit state refresh failed, keeping the last one: %s", exc)
        self._align_arms()

    async def _flush_impressions(self) -> None:
        pending, self._impressions = self._impressions, collections.defaultdict(collections.Counter)
        pending_expected, self._expected = self._expected, collections.defaultdict(collections.Counter)
        if not pending:
            return
        try:
            await self.feedback_log.add_impressions(pending, pending_expected)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("arms").inc()
            log.warning("bandit impressions not saved yet, retrying next refresh: %s", exc)
            for placement, items in pending.items():
                self._impressions[placement].update(items)
            for placement, sums in pending_expected.items():
                self._expected[placement].update(sums)

    def _align_arms(self) -> None:
        catalog = self.catalog
        if catalog is None:
            return
        if self._item_index[0] is not catalog:
            self._item_index = (catalog, {item.encode(): i for i, item in enumerate(catalog.item_ids)})
        index = self._item_index[1]
        arms: dict[str, Arms] = {}
        for placement, (impressions, successes, expected) in self._arm_counts.items():
            trials = arms_arrays(impressions, index, len(catalog))
            wins = np.minimum(arms_arrays(successes, index, len(catalog)), trials)
            arms[placement] = Arms(trials, wins, arms_arrays(expected, index, len(catalog)))
        self.arms = arms

    def _refresh_rules(self) -> bool:
        """Serve an edited rules file from the next refresh on; an invalid one is refused, the old kept."""
        try:
            text = self.rules_path.read_bytes()
        except OSError as exc:
            self.status.rules_error = f"{self.rules_path}: cannot read: {exc.strerror}"
            return False
        version = hashlib.sha256(text).hexdigest()[:12]
        if version == self.config_version:
            self.status.rules_error = None
            return False
        try:
            rules = parse_rules(text.decode("utf-8", errors="replace"), self.rules_path)
        except RulesError as exc:
            if self.status.rules_error != str(exc):
                log.error("rules file changed but is invalid; still serving config %s:\n%s", self.config_version, exc)
            self.status.rules_error = str(exc)
            metrics.RULES_LOADS.labels("refused").inc()
            return False
        self.rules, self.config_version, self.status.rules_error = rules, version, None
        metrics.RULES_LOADS.labels("loaded").inc()
        log.info("serving rules %s from %s", version, self.rules_path)
        return True

    def _refresh_model(self) -> bool:
        live = self.registry.live_version()
        if live is not None and live == self.status.model_version:
            self.status.refused_version = self.status.model_error = None  # LIVE points back at what we serve
            return False
        if live is None or live == self.status.refused_version:
            return False
        try:
            artifact = self.registry.verify(live)
            model = load_rec_model(artifact)
        except ArtifactError as exc:
            metrics.MODEL_LOADS.labels("refused").inc()
            self.status.refused_version, self.status.model_error = live, str(exc)
            log.error("model version %s refused, keeping %s: %s", live, self.status.model_version, exc)
            return False
        self.model = model
        self.status.model_version, self.status.model_error, self.status.refused_version = live, None, None
        metrics.MODEL_LOADS.labels("loaded").inc()
        metrics.set_model_version(live)
        log.info("serving model version %s", live)
        return True

    async def _refresh_catalog(self) -> bool:
        try:
            version = await self.background_store.catalog_version()
            if version is not None and (int(version) != self._catalog_version or self.status.catalog_source != "redis"):
                return await self._catch_up(int(version), self.background_store.client)
        except (StoreUnavailableError, RespError, RespConnectionError, TimeoutError) as exc:
            metrics.REDIS_ERRORS.labels("catalog").inc()
            log.warning("catalog refresh failed: %s", exc)
        if self.catalog is None and self.model is not None and self.model.catalog_snapshot:
            # Redis has no catalog (or is down) at start: serve the snapshot taken at training time.
            self.catalog = CatalogState.from_items(self.model.catalog_snapshot, f"model:{self.model.version}")
            self.status.catalog_source = "model_snapshot"
            return True
        return False

    async def _catch_up(self, target: int, client: RedisClient) -> bool:
        """Bring the in-memory catalog to `target`: the changed items only, or all when the log falls short."""
        async with self._catalog_lock:
            if target == self._catalog_version and self.status.catalog_source == "redis":
                return False  # another request caught up while this one waited
            from_redis = self.status.catalog_source == "redis" and target > self._catalog_version
            delta = await read_delta(client, self.keys, self._catalog_version if from_redis else -1)
            if delta.full_reload or not from_redis or self.catalog is None:
                version, items = await self.background_store.read_catalog()
                if not items:
                    return False
                catalog = await asyncio.to_thread(CatalogState.from_items, items, f"redis:{version}")
                self._catalog_version = int(version or 0)
            else:
                catalog = self.catalog.patched(delta.items, f"redis:{delta.version}")
                self._catalog_version = delta.version
            self.catalog = catalog
            self.status.catalog_version, self.status.catalog_source = str(self._catalog_version), "redis"
            await asyncio.to_thread(self._rebuild)
            return True

    def _rebuild(self) -> None:
        if self.catalog is None:
            return
        self.state = build_state(self.catalog, self.model, self.rules)
        self._align_arms()
        metrics.CATALOG_ITEMS.set(len(self.catalog))

    def store_failed(self, operation: str, exc: Exception) -> None:
        metrics.REDIS_ERRORS.labels(operation).inc()
        self.breaker.record_failure()
        metrics.BREAKER_OPEN.set(1 if self.breaker.state != "closed" else 0)
        log.warning("redis %s failed: %s", operation, exc)

    # ---- decisions -------------------------------------------------------------------------------
    async def read_profile(self, customer_id: str) -> tuple[Profile | None, str | None]:
        """The profile (and the catalog version) in one round trip, or the reason it could not be had."""
        if not self.breaker.allow():
            return None, "redis_circuit_open"
        try:
            profile, catalog_version = await self.store.read_profile_and_catalog_version(customer_id)
        except StoreUnavailableError as exc:
            self.store_failed("profile", exc)
            return None, "redis_unavailable"
        except ProfileDecodeError as exc:
            log.error("%s", exc)
            return None, "profile_unreadable"
        await self.store_succeeded(catalog_version)
        return profile, None

    async def store_succeeded(self, catalog_version: int | None) -> None:
        """A request's read worked: close the circuit, and catch up with a catalog changed by a webhook."""
        if self.breaker.state != "closed":
            metrics.BREAKER_OPEN.set(0)
        self.breaker.record_success()
        if catalog_version is not None and catalog_version != self._catalog_version:
            # A webhook changed the catalog: catch up before deciding, so a sold-out item is gone now.
            try:
                await self._catch_up(catalog_version, self.store.client)
            except (StoreUnavailableError, RespError, RespConnectionError, TimeoutError) as exc:
                metrics.REDIS_ERRORS.labels("catalog").inc()
                log.warning("catalog catch-up failed, deciding on version %s: %s", self._catalog_version, exc)

    async def recommend(self, req: Request) -> Decision:
        t0 = time.perf_counter()
        state = self.state
        if state is None:
            raise NotReadyError("no catalog loaded yet")
        profile, reason = await self.read_profile(req.customer_id)
        state = self.state or state
        arms = self.arms if state.catalog is self.catalog else {}
        decision = recommend(state, req, profile, fallback_reason=reason, explore=self.settings.exploration, arms=arms)
        if self.settings.decision_log:
            if reason in ("redis_unavailable", "redis_circuit_open"):
                # Redis just failed us: a write would only add its timeout to an answer already degraded.
                metrics.UNLOGGED.labels(req.placement, "redis_unavailable").inc()
            else:
                await self.log_decision(decision, req.context, profile)
        elapsed = time.perf_counter() - t0
        metrics.DECISION_LATENCY.labels(req.placement).observe(elapsed)
        metrics.DECISIONS.labels(req.placement).inc()
        if decision.fallback:
            metrics.FALLBACKS.labels(req.placement, decision.fallback_reason or "unknown").inc()
        return decision

    async def log_decision(
        self,
        decision: Decision,
        context: Context,
        profile: Profile | None,
        channel: str = "web",
        feedback_window_s: int | None = None,
    ) -> None:
        """Put the decision on the log's connection before answering, so feedback on it cannot overtake it."""
        await self.log_decisions([(decision, context, profile, channel, feedback_window_s)])

    async def log_decisions(self, decisions: list[tuple[Decision, Context, Profile | None, str, int | None]]) -> None:
        """`log_decision` for several decisions in one write (the email batch logs a chunk at once)."""
        if not decisions:
            return
        ts_ms = int(time.time() * 1000)
        records = []
        for decision, context, profile, channel, window in decisions:
            entry = decision_entry(
                decision,
                pseudonym=profile.pseudonym if profile else None,
                channel=channel,
                config_version=self.config_version,
                context=context,
                ts_ms=ts_ms,
            )
            track = decision.placement in self.arms
            if track:
                self._impressions[decision.placement].update(i.item_id for i in decision.items)
                if decision.expected_clicks:
                    self._expected[decision.placement].update(
                        dict(zip((i.item_id for i in decision.items), decision.expected_clicks, strict=True))
                    )
            records.append((decision, entry, track, window))
        try:
            replies = await self.decision_log.record_many(records)
        except (RespError, RespConnectionError, OSError) as exc:
            for decision, *_ in decisions:
                self._log_write_failed(decision, exc)
            return
        # Written before the answer goes out; the replies are checked off the request path.
        logged = [d for d, *_ in decisions]
        task = asyncio.create_task(self._check_log_write(logged, replies))
        self._log_writes.add(task)
        task.add_done_callback(self._log_writes.discard)

    async def log_writes_checked(self) -> None:
        """Wait until the replies of every decision log write in flight are checked (a write's failure is
        counted and logged by its check, not raised here)."""
        await asyncio.gather(*self._log_writes, return_exceptions=True)

    async def _check_log_write(self, decisions: list[Decision], replies: Coroutine[Any, Any, list[Any]]) -> None:
        try:
            await replies
        except TimeoutError:
            # The commands were on the connection, so Redis still runs them: only the reply was late.
            metrics.REDIS_ERRORS.labels("decision_log").inc()
        except (RespError, RespConnectionError, OSError) as exc:
            for decision in decisions:
                self._log_write_failed(decision, exc)

    def _log_write_failed(self, decision: Decision, exc: Exception) -> None:
        metrics.REDIS_ERRORS.labels("decision_log").inc()
        metrics.UNLOGGED.labels(decision.placement, "write_failed").inc()
        log.warning("decision %s not logged: %s", decision.decision_id, exc)

    async def feedback(self, decision_id: str, action: str, reward_type: str, reward: float) -> FeedbackResult | None:
        """Record a reward for a logged decision; None if Redis failed (nothing was recorded)."""
        try:
            result = await self.feedback_log.feedback(decision_id, action, reward_type, reward)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("feedback").inc()
            log.warning("feedback failed: %s", exc)
            return None
        metrics.FEEDBACK.labels(result.status).inc()
        return result

    async def erase(self, customer_id: str) -> list[str] | None:
        """Erase a customer's data; returns what existed, or None if Redis failed."""
        try:
            return await erase_customer(self.ingest_client, self.keys, customer_id)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("erasure").inc()
            log.warning("erasure failed: %s", exc)
            return None

    async def ingest(self, events: list[LiveEvent]) -> list[bool] | None:
        """Apply events to profiles; per event True (accepted) or False (duplicate); None if Redis failed.

        Ingest does not consult the circuit breaker: an event is either written or the caller is told
        to retry, never silently dropped.
        """
        try:
            statuses = await self.event_writer.apply(events)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("ingest").inc()
            log.warning("event ingest failed: %s", exc)
            return None
        metrics.EVENTS.labels("accepted").inc(sum(statuses))
        metrics.EVENTS.labels("duplicate").inc(len(statuses) - sum(statuses))
        return statuses

    async def upsert_items(self, patches: list[tuple[str, dict[str, object]]]) -> UpsertResult | None:
        """Merge item changes into the catalog in Redis; None if Redis failed (nothing was written)."""
        try:
            return await self.catalog_writer.upsert(patches)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("catalog_write").inc()
            log.warning("catalog upsert failed: %s", exc)
            return None

    async def set_consent(
        self, customer_id: str, changes: dict[str, bool], evidence: dict[str, object]
    ) -> frozenset[str] | None:
        """Change consents (applied to the very next decision); None if Redis failed and nothing changed."""
        try:
            return await set_consent(self.ingest_client, self.keys, customer_id, changes, evidence)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("consent").inc()
            log.warning("consent update failed: %s", exc)
            return None

    def _signing_status(self) -> str:
        signer = self.email_signer
        if not signer.ephemeral:
            return f"{len(signer.keys)} configured key(s), signing with {signer.keys[0][0]}"
        return "demo key kept in Redis" if signer.keys[0][0] == "r1" else "key of this process only"

    async def readiness(self) -> dict[str, object]:
        redis_ok = await self.background_store.ping()
        return {
            "ready": redis_ok and self.model is not None and self.state is not None,
            "redis": redis_ok,
            "circuit": self.breaker.state,
            # The version decisions use now: a new model counts once its serving state is built.
            "model_version": self.state.model_version if self.state is not None else None,
            "model_error": self.status.model_error,
            "catalog_version": self.status.catalog_version,
            "catalog_source": self.status.catalog_source,
            "catalog_items": len(self.catalog) if self.catalog else 0,
            "config_version": self.config_version,
            "rules_error": self.status.rules_error,
            "email_signing": self._signing_status(),
            # The other workers that decide chunks of this worker's pre-send batches (None: not shared).
            "batch_peers": len(self.peers.others()) if self.peers is not None else None,
        }


class NotReadyError(RuntimeError):
    pass
