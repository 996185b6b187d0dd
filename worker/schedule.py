"""The retrain schedule for `imgq beat`, and a scheduler that fires each tick once per deployment.

Celery beat started twice fires every entry twice (celery#2856). Before sending, each beat claims the
tick in Redis (SET NX on the entry name and due time); a second beat finds it taken, logs it, and sends
nothing. The retrain lock (model.retrain) separately keeps two retrains from running at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.beat import PersistentScheduler, ScheduleEntry
from celery.schedules import crontab, schedule

from imgq import keys, redis_conn
from imgq.celery_app import RETRAIN_TASK, app_settings
from imgq.settings import Settings

log = logging.getLogger(__name__)

ENTRY = "imgq-retrain"


def retrain_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat_schedule for these settings; empty when no schedule is set."""
    if settings.retrain_cron:
        minute, hour, day, month, weekday = settings.retrain_cron.split()
        when: Any = crontab(minute=minute, hour=hour, day_of_month=day, month_of_year=month, day_of_week=weekday)
    elif settings.retrain_interval_s:
        when = schedule(run_every=settings.retrain_interval_s)
    else:
        return {}
    return {ENTRY: {"task": RETRAIN_TASK, "schedule": when, "options": {"queue": settings.train_queue},
                    "kwargs": {"source": settings.retrain_data, "arch": settings.retrain_arch,
                               "epochs": settings.retrain_epochs, "trigger": "beat"}}}


class OncePerTickScheduler(PersistentScheduler):  # type: ignore[misc]
    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        # The tick: due time rounded to the schedule's resolution, the same in every beat process.
        period = 60.0 if isinstance(entry.schedule, crontab) else entry.schedule.run_every.total_seconds()
        tick = int(time.time() // max(period, 1.0))
        client = redis_conn.connect(app_settings(self.app).redis_url, socket_connect_timeout=5)
        try:
            claimed = client.set(keys.beat_tick(entry.name, tick), "1", nx=True, ex=int(max(period, 60) * 2))
        finally:
            client.close()
        if not claimed:
            log.warning("beat: %s tick %d already fired by another beat; not sending it again", entry.name, tick)
            return
        log.info("beat: firing %s", entry.name)
        super().apply_entry(entry, producer=producer)
