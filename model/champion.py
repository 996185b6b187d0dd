"""Which model version is the champion: one pointer and its history, in Redis when there is one, mirrored on disk.

    Redis  imgq:champion                 version id that workers serve (checked between batches)
    Redis  imgq:champion:history         LIST of promoted versions, oldest first: `rollback` goes back one
    disk   MODEL_DIR/CHAMPION            the mirror of both (model.registry), so `imgq run`, `imgq train`
    disk   MODEL_DIR/CHAMPION_HISTORY    and a fresh Redis find the same champion

With Redis, Redis is the source of truth and every change (promote, rollback, the gate's compare-and-set)
is one WATCH/MULTI transaction over both keys; the disk mirror is then written from the state committed.
Without Redis (local `imgq train`), the files are the truth. Either way the change runs under the
exclusive flock of MODEL_DIR/CHAMPION.lock, taken before anything is read, so changes are serialised and
the last mirror written is the latest state. A Redis without the keys (new, or flushed) is seeded from
disk inside the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import redis

from imgq import keys, redis_conn
from imgq.errors import ImgqError
from model import pointer
from model.pointer import ChampionState

CHAMPION_KEY = keys.CHAMPION
HISTORY_KEY = keys.CHAMPION_HISTORY
HISTORY_FILE = pointer.HISTORY_FILE
# WATCH conflicts come only from writers on another host (ours wait on the flock): a few retries suffice.
_MAX_ATTEMPTS = 50

log = logging.getLogger(__name__)

Transition = Callable[[ChampionState], ChampionState]


class _Conflict(Exception):
    """The champion is not the one a compare-and-set expected."""

    def __init__(self, current: str | None) -> None:
        super().__init__(current)
        self.current = current


class Champion:
    def __init__(self, model_dir: Path, client: redis.Redis | None = None) -> None:
        self.model_dir = model_dir
        self.r = client

    def get(self) -> str | None:
        """The champion now (one GET when Redis has it: workers call this between batches)."""
        if self.r is not None:
            raw = self.r.get(CHAMPION_KEY)
            if raw is not None:
                return _text(raw)
        return self.state().pointer

    def state(self) -> ChampionState:
        """The pointer and history, read together (seeding an empty Redis from disk)."""
        if self.r is not None:
            with self.r.pipeline(transaction=True) as pipe:
                pipe.get(CHAMPION_KEY)
                pipe.lrange(HISTORY_KEY, 0, -1)
                raw, history = pipe.execute()
            if raw is not None and history:
                return ChampionState(_text(raw), tuple(_text(v) for v in history))
        try:
            return self._change(lambda state: state)
        except OSError as exc:  # a read-only MODEL_DIR: no lock, no mirror; read the files as they are
            log.warning("cannot lock %s (%s): reading the champion files unlocked", self.model_dir, exc)
            return pointer.read_champion_state(self.model_dir)

    def set(self, version: str) -> None:
        """Promote ``version`` (it must be published); records it in the history."""
        _require_published(self.model_dir, version)
        self._change(lambda state: _promoted(state, version))

    def promote_if(self, version: str, *, expected: str | None) -> tuple[bool, str | None]:
        """Compare-and-set: promote ``version`` only if the champion is still ``expected`` (None: no champion).

        Returns (promoted, the champion now).
        """
        _require_published(self.model_dir, version)

        def step(state: ChampionState) -> ChampionState:
            if state.pointer != expected:
                raise _Conflict(state.pointer)
            return _promoted(state, version)

        try:
            return True, self._change(step).pointer
        except _Conflict as conflict:
            return False, conflict.current

    def rollback(self) -> str:
        """Back to the champion before the current one; returns it."""
        def step(state: ChampionState) -> ChampionState:
            history = list(state.history)
            while history and history[-1] == state.pointer:
                history.pop()
            if not history:
                where = f"Redis {HISTORY_KEY}" if self.r is not None else str(self.model_dir / HISTORY_FILE)
                raise ImgqError(f"no earlier champion to roll back to in {where}")
            _require_published(self.model_dir, history[-1])
            return ChampionState(history[-1], tuple(history))

        pointer = self._change(step).pointer
        assert pointer is not None  # a rollback always lands on a version
        return pointer

    def history(self) -> list[str]:
        return list(self.state().history)

    def _change(self, step: Transition) -> ChampionState:
        """Apply ``step`` to the truth atomically and mirror the result on disk, all under the flock."""
        with pointer.champion_lock(self.model_dir):
            disk = pointer.read_champion_state(self.model_dir)
            new = step(disk) if self.r is None else self._commit(step, disk)
            if new != disk:
                pointer.write_champion_state(self.model_dir, new)
            return new

    def _commit(self, step: Transition, disk: ChampionState) -> ChampionState:
        assert self.r is not None
        with self.r.pipeline() as pipe:
            for _ in range(_MAX_ATTEMPTS):
                try:
                    pipe.watch(CHAMPION_KEY, HISTORY_KEY)  # type: ignore[no-untyped-call]
                    raw = pipe.get(CHAMPION_KEY)
                    stored = ChampionState(None if raw is None else _text(raw),
                                           tuple(_text(v) for v in pipe.lrange(HISTORY_KEY, 0, -1)))
                    new = step(_from_redis(stored, disk))
                    if new.pointer is None or new == stored:
                        pipe.reset()
                        return new
                    pipe.multi()
                    pipe.set(CHAMPION_KEY, new.pointer)
                    pipe.delete(HISTORY_KEY)
                    pipe.rpush(HISTORY_KEY, *new.history)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue
        raise ImgqError(f"the champion in Redis kept changing under {_MAX_ATTEMPTS} attempts to update it")


def _from_redis(stored: ChampionState, disk: ChampionState) -> ChampionState:
    """What Redis holds; the disk's state where Redis has no pointer; a history that ends at the pointer."""
    if stored.pointer is None:
        return disk
    history = stored.history or disk.history  # a Redis from before the history key
    if history[-1:] != (stored.pointer,):
        history = (*history, stored.pointer)
    return ChampionState(stored.pointer, history)


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _promoted(state: ChampionState, version: str) -> ChampionState:
    history = state.history if state.history[-1:] == (version,) else (*state.history, version)
    return ChampionState(version, history)


def connect_optional(url: str) -> redis.Redis | None:
    """A Redis client if one answers quickly, else None (local `imgq train` works without Redis)."""
    client = redis_conn.connect(url, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        log.info("no Redis at %s: champion pointer written on disk only", url)
        client.close()
        return None
    return client


def _require_published(model_dir: Path, version: str) -> None:
    # Imported here: reading the pointer (`imgq status`, the supervisor) must not load torch; promoting may.
    from model.registry import require_published

    require_published(model_dir, version)
