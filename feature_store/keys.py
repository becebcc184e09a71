"""The Redis key layout, in one place.

Every key starts with a configurable prefix (default ``nb``). Keys of one customer share the hash
tag ``{c:<customer_id>}``, so on Redis Cluster they live in one slot and a request stays one round
trip on one node; the catalog's keys share ``{catalog}``.

| key                              | type   | holds                                                   |
| -------------------------------- | ------ | ------------------------------------------------------- |
| ``<p>:{c:<id>}:profile``         | string | the live profile: a compact JSON object (fields below)   |
| ``<p>:{c:<id>}:consent``         | list   | consent changes as evidence (newest first, last 100)      |
| ``<p>:{c:<id>}:seen``            | zset   | ids of the customer's last 200 events (dedupe), 7-day TTL |
| ``<p>:{c:<id>}:cap:<scope>``     | zset   | impressions in one cap scope, scored by ms; TTL its longest window |
| ``<p>:{c:<id>}:capkeys``         | hash   | cap scope → its longest window (s); TTL the longest of them     |
| ``<p>:{c:<id>}:ignored``         | hash   | offer_id → impressions since the last positive feedback, 30 d TTL |
| ``<p>:{c:<id>}:email:<campaign>``| string | the email content decided for a campaign (JSON), TTL the content's |
| ``<p>:{c:<id>}:emails``          | set    | campaigns with stored content (erasure finds them); TTL the longest |
| ``<p>:{catalog}:items``          | hash   | item_id → JSON of the item (price, stock, margin, …)     |
| ``<p>:{catalog}:version``        | string | counter, incremented on every catalog change             |
| ``<p>:{catalog}:changes``        | zset   | item_id → version of its last webhook change (capped)    |
| ``<p>:{catalog}:base``           | string | oldest version the change log can bring a worker up from |
| ``<p>:meta:loaded``              | hash   | when and from what the last bulk load ran                |
| ``<p>:meta:email-signing-key``   | string | click-link key when none is configured (demo only)       |
| ``<p>:{log}:stream``             | stream | the decision log: decisions and rewards (drained by export) |
| ``<p>:{log}:d:<decision_id>``    | string | shown actions of a decision, for joining feedback (TTL)  |
| ``<p>:{log}:f:<decision_id>``    | set    | feedback already recorded for a decision (idempotency)   |
| ``<p>:{log}:export``             | string | the export in progress: file and stream ids (recovery)   |
| ``<p>:{policy:<placement>}:n``   | hash   | item_id → impressions (bandit arms of the placement)     |
| ``<p>:{policy:<placement>}:s``   | hash   | item_id → successes (first positive feedback per decision) |
| ``<p>:{policy:<placement>}:e``   | hash   | item_id → clicks the ranker expected for its impressions (thompson_lift) |

A string rather than a hash: a hash with a value over 64 bytes leaves Redis's compact listpack
encoding and costs three times the memory. Profile fields: ``v`` recent views (comma-separated ids,
newest first), ``k`` cart, ``p`` purchases
(``item:count:first_day:last_day`` joined by ``;``, newest first), ``cs`` consent bits, ``o`` orders,
``m`` spend, ``u`` updated at, ``ps`` the random pseudonym the decision log knows the customer by (kept
across bulk reloads), ``x`` the load-time snapshot (segment, country, category affinities, model features);
defaults are left out. The exact format, and the older one still read, is in feature_store.profiles.

Caps (``feature_store.caps``): a scope is free-form, e.g. ``offer:<id>``, ``class:<priority class>``,
``channel:<channel>``; a cap key's members are ``<ms>:<nonce>:<offer_id>``, one per impression. The
``capkeys`` hash lists the scopes in use, so trimming knows each scope's longest window and erasure
finds the per-scope keys (``feature_store.caps.cap_keys``). ``ignored`` drives suppression.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "nb"

    def customer_tag(self, customer_id: str) -> str:
        return f"{{c:{customer_id}}}"

    def profile(self, customer_id: str) -> str:
        return f"{self.prefix}:{{c:{customer_id}}}:profile"

    def consent_evidence(self, customer_id: str) -> str:
        return f"{self.prefix}:{{c:{customer_id}}}:consent"

    def seen_events(self, customer_id: str) -> str:
        return f"{self.prefix}:{{c:{customer_id}}}:seen"

    def caps(self, customer_id: str, scope: str) -> str:
        return f"{self.prefix}:{{c:{customer_id}}}:cap:{scope}"

    def cap_scopes(self, customer_id: str) -> str:
        return f"{self.prefix}:{{c:{customer_id}}}:capkeys"

    def offer_ignored(self, customer_id: str) -> str:
        return f"{self.prefix}:{{c:{customer_id}}}:ignored"

    def email_content(self, customer_id: str, campaign_id: str) -> str:
        return f"{self.prefix}:{{c:{customer_id}}}:email:{campaign_id}"

    def email_campaigns(self, customer_id: str) -> str:
        return f"{self.prefix}:{{c:{customer_id}}}:emails"

    def customer_keys(self, customer_id: str) -> dict[str, str]:
        """Every fixed-name key that holds data about one customer, by what it holds (erasure deletes them all).

        The per-scope cap keys are not fixed names: ``feature_store.caps.cap_keys`` lists them from the
        ``cap_scopes`` hash, which is why that hash is here.
        """
        return {
            "profile": self.profile(customer_id),
            "consent_evidence": self.consent_evidence(customer_id),
            "event_dedupe": self.seen_events(customer_id),
            "cap_scopes": self.cap_scopes(customer_id),
            "offer_ignored": self.offer_ignored(customer_id),
            "email_campaigns": self.email_campaigns(customer_id),
        }

    @property
    def log_stream(self) -> str:
        return f"{self.prefix}:{{log}}:stream"

    def logged_decision(self, decision_id: str) -> str:
        return f"{self.prefix}:{{log}}:d:{decision_id}"

    def feedback_seen(self, decision_id: str) -> str:
        return f"{self.prefix}:{{log}}:f:{decision_id}"

    @property
    def log_export(self) -> str:
        return f"{self.prefix}:{{log}}:export"

    @property
    def log_export_lock(self) -> str:
        """Held by the one export running (two at once would export the same pending entries twice)."""
        return f"{self.prefix}:{{log}}:export-lock"

    @property
    def log_unreadable(self) -> str:
        """Entries of the decision log that an export could not read, kept as they were (stream id and bytes)."""
        return f"{self.prefix}:{{log}}:unreadable"

    def arm_impressions(self, placement: str) -> str:
        return f"{self.prefix}:{{policy:{placement}}}:n"

    def arm_successes(self, placement: str) -> str:
        return f"{self.prefix}:{{policy:{placement}}}:s"

    def arm_expected(self, placement: str) -> str:
        return f"{self.prefix}:{{policy:{placement}}}:e"

    @property
    def catalog_items(self) -> str:
        return f"{self.prefix}:{{catalog}}:items"

    @property
    def catalog_version(self) -> str:
        return f"{self.prefix}:{{catalog}}:version"

    @property
    def catalog_changes(self) -> str:
        return f"{self.prefix}:{{catalog}}:changes"

    @property
    def catalog_base(self) -> str:
        return f"{self.prefix}:{{catalog}}:base"

    @property
    def email_signing_key(self) -> str:
        return f"{self.prefix}:meta:email-signing-key"

    @property
    def load_meta(self) -> str:
        return f"{self.prefix}:meta:loaded"

    @property
    def all_pattern(self) -> str:
        return f"{self.prefix}:*"
