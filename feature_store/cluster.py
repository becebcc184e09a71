"""Redis Cluster: the `redis+cluster://` URL, a slot-routing request-path client, and the batch jobs' client.

`ClusterLeanRedis` has `LeanRedis`'s interface and keeps one `LeanRedis` per master. Each command goes to the
master of its key's slot (CRC16 of the hash tag, as Redis computes it); a pipeline's commands are grouped
per node and the groups are written at once and awaited together, so a request that reads a customer's
profile (its node) and the catalog version (the catalog's node) still costs one round-trip time. A script
or a MULTI…EXEC block must stay in one slot — the key layout (feature_store.keys) makes that so by
construction, and a call that breaks it raises `CrossSlotError` before anything is sent. A MOVED or ASK reply
(a resharding) refreshes the slot map and the command is sent once more where Redis pointed.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import redis
from redis.cluster import ClusterNode, RedisCluster

from feature_store.resp import Arg, LeanRedis, RedisClient, RespConnectionError, RespError, Script

SLOTS = 16384
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
STALE_REFRESH_S = 1.0  # after a lost connection, re-read the slot map at most this often (failover)

# Commands without a key: they go with the pipeline's other commands, or to any master.
_KEYLESS = frozenset(
    b"PING MULTI EXEC DISCARD SCRIPT INFO CLUSTER ASKING AUTH SELECT ECHO TIME DBSIZE CLIENT CONFIG "
    b"FLUSHDB FLUSHALL READONLY READWRITE HELLO COMMAND".split()
)
_ALL_KEYS = frozenset(b"DEL UNLINK EXISTS TOUCH MGET WATCH".split())  # every argument is a key
_KEY_VALUE_PAIRS = frozenset(b"MSET MSETNX".split())
_SCRIPTS = frozenset(b"EVAL EVALSHA".split())


class CrossSlotError(ValueError):
    """One script, multi-key command or transaction names keys in different slots: a bug in a key layout,
    which no retry can fix (Redis Cluster runs such a call on one node only)."""


def _raw(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode() if isinstance(value, str) else str(value).encode()


def key_slot(key: bytes) -> int:
    """The cluster slot of a key: CRC16 (XMODEM) of its hash tag — the part between the first ``{`` and the
    next ``}`` when that part is not empty — or of the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


def command_keys(command: Sequence[Arg]) -> list[bytes]:
    """The keys a command touches (by the conventions of the commands the request path sends)."""
    if not command:
        raise ValueError("empty Redis command")
    name = _raw(command[0]).upper()
    if name in _KEYLESS or len(command) < 2:
        return []
    if name in _SCRIPTS:
        numkeys = int(command[2])
        return [_raw(k) for k in command[3 : 3 + numkeys]]
    if name in _ALL_KEYS:
        return [_raw(k) for k in command[1:]]
    if name in _KEY_VALUE_PAIRS:
        return [_raw(k) for k in command[1::2]]
    return [_raw(command[1])]


def command_slot(command: Sequence[Arg]) -> int | None:
    """The one slot a command's keys live in (None if it has no key); `CrossSlotError` if they span slots."""
    keys = command_keys(command)
    if not keys:
        return None
    slots = {key_slot(k) for k in keys}
    if len(slots) > 1:
        shown = ", ".join(k.decode(errors="replace") for k in keys[:4])
        raise CrossSlotError(
            f"{_raw(command[0]).decode().upper()} touches keys in {len(slots)} cluster slots ({shown}"
            f"{', …' if len(keys) > 4 else ''}): keys used together must share a hash tag (feature_store.keys)"
        )
    return slots.pop()


@dataclass
class _Unit:
    """Commands that must go to one node together: a single command, or a whole MULTI…EXEC block."""

    indices: list[int]
    commands: list[Sequence[Arg]]
    slot: int | None


def _units(commands: Sequence[Sequence[Arg]]) -> list[_Unit]:
    units: list[_Unit] = []
    block: _Unit | None = None
    for i, command in enumerate(commands):
        name = _raw(command[0]).upper() if command else b""
        slot = command_slot(command)
        if block is None:
            if name == b"MULTI":
                block = _Unit([i], [command], None)
            else:
                units.append(_Unit([i], [command], slot))
            continue
        block.indices.append(i)
        block.commands.append(command)
        if slot is not None:
            if block.slot is not None and slot != block.slot:
                raise CrossSlotError(
                    f"a MULTI…EXEC block touches cluster slots {block.slot} and {slot} (command {i}: "
                    f"{name.decode()}): a transaction's keys must share a hash tag (feature_store.keys)"
                )
            block.slot = slot
        if name in (b"EXEC", b"DISCARD"):
            units.append(block)
            block = None
    if block is not None:
        raise ValueError("a pipeline opens MULTI without EXEC or DISCARD")
    return units


@dataclass(frozen=True)
class ClusterUrl:
    """``redis+cluster://[user:password@]host:port[,host:port…][?ssl_ca_certs=…]`` (``rediss+cluster`` for TLS):
    the seed nodes the slot map is first read from; the others are found through them."""

    scheme: str  # redis | rediss: how each node is reached
    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    query: str = ""

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in CLUSTER_SCHEMES:
            raise ValueError(f"not a Redis Cluster URL: {url!r} (expected redis+cluster://host:port[,host:port])")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        if path.strip("/") not in ("", "0"):
            raise ValueError(f"Redis Cluster has only database 0, the URL asks for {path.strip('/')!r}")
        userinfo, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, pw = userinfo.partition(":")
            username, password = (unquote(user) or None, unquote(pw)) if colon else (None, unquote(user))
        seeds = tuple(_host_port(h, url) for h in hosts.split(",") if h.strip())
        if not seeds:
            raise ValueError(f"a Redis Cluster URL needs at least one host:port: {url!r}")
        return cls(CLUSTER_SCHEMES[scheme], seeds, username, password, query)

    def node_url(self, host: str, port: int) -> str:
        """The plain URL of one node, for `LeanRedis` (same credentials and TLS settings)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        where = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{auth}{where}:{port}" + (f"?{self.query}" if self.query else "")


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"{text.strip()!r} in {url!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def _redirect(reply: Any) -> tuple[str, str] | None:
    """("MOVED" | "ASK", "host:port") if the reply is a redirection."""
    if isinstance(reply, RespError):
        parts = str(reply).split()
        if len(parts) == 3 and parts[0] in ("MOVED", "ASK"):
            return parts[0], parts[2]
    return None


def _first_error(results: list[Any]) -> list[Any]:
    error = next((r for r in results if isinstance(r, Exception)), None)
    if error is not None:
        raise error
    return results


async def _raising(replies: Coroutine[Any, Any, list[Any]]) -> list[Any]:
    return _first_error(await replies)


@dataclass
class _Sent:
    node: str
    units: list[_Unit]
    replies: Coroutine[Any, Any, list[Any]]
    asking: bool = False


@dataclass
class _SlotMap:
    nodes: list[str | None] = field(default_factory=lambda: [None] * SLOTS)  # slot -> "host:port" of its master
    generation: int = 0
    read_at: float = 0.0


class ClusterLeanRedis:
    """`LeanRedis` for a Redis Cluster: same methods, same deadlines, commands routed by slot."""

    def __init__(self, url: str, timeout_s: float, max_pending: int = 10_000) -> None:
        self.url = ClusterUrl.parse(url)
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._nodes: dict[str, LeanRedis] = {}
        self._map: _SlotMap | None = None
        self._map_lock: asyncio.Lock | None = None
        self._stale = False
        self._background: set[asyncio.Task[None]] = set()

    # ---- topology ----------------------------------------------------------------------------------
    def node(self, address: str) -> LeanRedis:
        """The client of one node ("host:port"), made on first use."""
        client = self._nodes.get(address)
        if client is None:
            host, port = _host_port(address, address)
            client = LeanRedis(self.url.node_url(host, port), self.timeout_s, self.max_pending)
            self._nodes[address] = client
        return client

    def masters(self) -> list[str]:
        """Addresses of the masters serving slots, in slot order (after the map was read)."""
        seen: dict[str, None] = {}
        for address in self._map.nodes if self._map else []:
            if address is not None:
                seen.setdefault(address)
        return list(seen)

    def slot_owner(self, slot: int) -> str | None:
        """The master ("host:port") a slot's commands go to; None before the slot map was read."""
        return self._map.nodes[slot] if self._map else None

    async def refresh_slots(self, seen_generation: int | None = None) -> None:
        """Re-read the slot map with CLUSTER SLOTS from a seed or a known node (skipped if another call
        already refreshed it since `seen_generation`)."""
        if self._map_lock is None:
            self._map_lock = asyncio.Lock()
        async with self._map_lock:
            if self._map is not None and seen_generation is not None and self._map.generation != seen_generation:
                return
            candidates = dict.fromkeys([f"{h}:{p}" for h, p in self.url.seeds] + self.masters())
            errors = []
            for address in candidates:
                host, port = _host_port(address, address)
                # Same deadline as any command: with the cluster unreachable, a request still fails on budget.
                probe = LeanRedis(self.url.node_url(host, port), self.timeout_s)
                try:
                    reply = await probe.execute("CLUSTER", "SLOTS")
                except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
                    errors.append(f"{address}: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    await probe.close()
                self._map = self._parse_slots(reply, host, self._map.generation + 1 if self._map else 1)
                self._stale = False
                return
            raise RespConnectionError("no Redis Cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    @staticmethod
    def _parse_slots(reply: list[Any], asked_host: str, generation: int) -> _SlotMap:
        slot_map = _SlotMap(generation=generation, read_at=time.monotonic())
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            # An empty or "?" host means "the address you reached me at" (cluster-announce unset).
            address = f"{host if host not in ('', '?') else asked_host}:{int(master[1])}"
            slot_map.nodes[start : end + 1] = [address] * (end - start + 1)
        return slot_map

    async def _slot_map(self) -> _SlotMap:
        slot_map = self._map
        if slot_map is None:
            await self.refresh_slots()
            assert self._map is not None
            return self._map
        if self._stale and time.monotonic() - slot_map.read_at > STALE_REFRESH_S:
            # A node was lost (failover?): re-read the map off the request path; this request goes as mapped.
            self._stale = False
            task = asyncio.create_task(self._refresh_quietly(slot_map.generation))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return slot_map

    async def _refresh_quietly(self, generation: int) -> None:
        with contextlib.suppress(RespConnectionError):
            await self.refresh_slots(generation)

    # ---- sending -----------------------------------------------------------------------------------
    def _owner(self, slot_map: _SlotMap, slot: int) -> str:
        address = slot_map.nodes[slot]
        if address is None:
            raise RespConnectionError(f"cluster slot {slot} is served by no master (cluster down?)")
        return address

    async def _send(self, commands: Sequence[Sequence[Arg]]) -> Coroutine[Any, Any, list[Any]]:
        """Write every node's group now; the awaitable settles the replies in the caller's order."""
        units = _units(commands)
        slot_map = await self._slot_map()
        keyed = next((u.slot for u in units if u.slot is not None), None)
        # Keyless commands ride along with the pipeline's first keyed command, else go to slot 0's master.
        default = self._owner(slot_map, keyed if keyed is not None else 0)
        groups: dict[str, list[_Unit]] = {}
        for unit in units:
            address = default if unit.slot is None else self._owner(slot_map, unit.slot)
            groups.setdefault(address, []).append(unit)
        sent = await self._write(groups)
        return self._collect(len(commands), sent, slot_map.generation)

    async def _write(self, groups: dict[str, list[_Unit]], asking: bool = False) -> list[_Sent]:
        sent: list[_Sent] = []
        try:
            for address, units in groups.items():
                commands = [c for u in units for c in u.commands]
                if asking:  # ASK: the target serves the migrating slot only for a command right after ASKING
                    commands = [c for command in commands for c in (("ASKING",), command)]
                replies = await self.node(address).send_settled(commands)
                sent.append(_Sent(address, units, replies, asking))
        except BaseException:
            # Nodes already written to still answer: collect their replies so none is left unretrieved.
            await asyncio.gather(*(s.replies for s in sent), return_exceptions=True)
            self._stale = True
            raise
        return sent

    async def _collect(self, size: int, sent: list[_Sent], generation: int, retry: bool = True) -> list[Any]:
        results: list[Any] = [None] * size
        settled = await asyncio.gather(*(s.replies for s in sent), return_exceptions=True)
        failure: BaseException | None = None
        redirected: dict[str, list[_Unit]] = {}
        ask: dict[str, list[_Unit]] = {}
        moved = False
        for s, got in zip(sent, settled, strict=True):
            if isinstance(got, BaseException):
                if isinstance(got, RespConnectionError | OSError):
                    self._stale = True
                failure = failure or got
                continue
            replies = got[1::2] if s.asking else got  # without the ASKING replies
            at = 0
            for unit in s.units:
                part = replies[at : at + len(unit.commands)]
                at += len(unit.commands)
                target = next((r for r in map(_redirect, part) if r is not None), None)
                if target is not None and retry:
                    kind, address = target
                    if address.startswith(":"):
                        address = s.node.rpartition(":")[0] + address
                    moved = moved or kind == "MOVED"
                    (ask if kind == "ASK" else redirected).setdefault(address, []).append(unit)
                    continue
                for i, reply in zip(unit.indices, part, strict=True):
                    results[i] = reply
        if failure is not None:
            raise failure
        if moved:
            await self.refresh_slots(generation)
        again = [*await self._write(redirected), *await self._write(ask, asking=True)]
        if again:
            # Sent once more where Redis pointed; a second redirection is an error reply for the caller.
            retried = await self._collect(size, again, generation, retry=False)
            for s in again:
                for unit in s.units:
                    for i in unit.indices:
                        results[i] = retried[i]
        return results

    # ---- LeanRedis's interface ---------------------------------------------------------------------
    async def execute(self, *args: Arg) -> Any:
        return (await self.pipeline([args]))[0]

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Commands grouped by node, the groups sent concurrently; replies in the given order (RespError on an
        error reply)."""
        return _first_error(await (await self._send(commands)))

    async def pipeline_written(self, commands: Sequence[Sequence[Arg]]) -> Coroutine[Any, Any, list[Any]]:
        """As `LeanRedis.pipeline_written`: each node's commands are on its connection once this returns."""
        return _raising(await self._send(commands))

    async def run_script(self, script: Script, calls: Sequence[Sequence[Arg]]) -> list[Any]:
        """One EVALSHA per call on the master of the call's slot; a node that lacks the script gets it loaded
        and only the calls it refused (NOSCRIPT: they did not run) are sent again."""
        commands = [("EVALSHA", script.sha, *call) for call in calls]
        results = await (await self._send(commands))
        missing = [i for i, r in enumerate(results) if isinstance(r, RespError) and "NOSCRIPT" in str(r)]
        if missing:
            # Rare (a restarted or promoted master): load it on every master rather than track who refused.
            await asyncio.gather(*(self.node(n).execute("SCRIPT", "LOAD", script.source) for n in self.masters()))
            again = await (await self._send([commands[i] for i in missing]))
            for i, reply in zip(missing, again, strict=True):
                results[i] = reply
        return _first_error(results)

    async def close(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        nodes, self._nodes = list(self._nodes.values()), {}
        for client in nodes:
            await client.close()


def connect(url: str, timeout_s: float, max_pending: int = 10_000) -> RedisClient:
    """The request-path client for a REDIS_URL: `ClusterLeanRedis` for redis+cluster:// and rediss+cluster://,
    else `LeanRedis` (redis://, rediss://, unix://)."""
    if is_cluster_url(url):
        return ClusterLeanRedis(url, timeout_s, max_pending)
    return LeanRedis(url, timeout_s, max_pending)


SyncRedis = redis.Redis | RedisCluster


def sync_client(url: str, timeout_s: float) -> SyncRedis:
    """redis-py's client for batch jobs and tools: `RedisCluster` for a cluster URL, else `redis.Redis`.

    On a cluster, a pipeline's commands are routed per slot, a `transaction=True` pipeline must keep to one
    slot, and FLUSHDB, SCAN and SCRIPT LOAD reach every master.
    """
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    parsed = ClusterUrl.parse(url)
    ca = parse_qs(parsed.query).get("ssl_ca_certs", [None])[0]
    tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": ca} if parsed.scheme == "rediss" else {}
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.seeds],  # type: ignore[no-untyped-call]
        username=parsed.username,
        password=parsed.password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        **tls,
    )
