"""Freshness checks: an asset with a schedule or a sensor warns when its last materialization is too old.

The limit is the longest pause the spec allows between two runs plus a grace: for ``schedule`` the longest gap
between two ticks of its cron (an hourly cron: 1 h; weekdays at 09:00: the 3 days over the weekend), for
``sensor`` ``SENSOR_INTERVAL_FACTOR`` times its ``minimum_interval_seconds``; the grace is 10 % of that,
at least 15 minutes (run time and a late tick). Dagster's own last-update freshness checks do the evaluation
(check ``freshness_check``, severity WARN), and its freshness sensor runs them when one can have become overdue.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from dativo_dagster.spec import AssetSpecModel, LoadedSpec

FRESHNESS_CHECK = "freshness_check"  # the name Dagster's freshness checks carry
FRESHNESS_SENSOR = "dativo_freshness_sensor"
FRESHNESS_SENSOR_INTERVAL_SECONDS = 60
# a sensor starts a run only when files arrive: missing ten of its evaluations in a row means nothing came
SENSOR_INTERVAL_FACTOR = 10
MIN_GRACE = timedelta(minutes=15)
GRACE_SHARE = 0.1
# the cron is sampled from a fixed Monday (the limit does not depend on when the code location loads), one
# window after the other, until the sample holds this many ticks or reaches 5 years (crons on 29 February)
CRON_SAMPLE_START = datetime(2024, 1, 1)
CRON_SAMPLE_TICKS = 1000
CRON_SAMPLE_HORIZON = timedelta(days=5 * 366)
_TICK_FORMAT = "%Y-%m-%dT%H:%M%z"


@functools.lru_cache(maxsize=128)
def schedule_interval(cron: str, timezone: str) -> timedelta | None:
    """The longest gap between two consecutive ticks of ``cron`` in ``timezone`` (``None``: it never fires twice).

    Dagster's time-window partitions of the cron give its ticks, so the gaps follow Dagster's own cron and
    daylight-saving rules (a daily cron in Europe/Berlin: 25 h across the autumn change).
    """
    start = CRON_SAMPLE_START.replace(tzinfo=ZoneInfo(timezone))
    horizon = start + CRON_SAMPLE_HORIZON
    ticks: list[datetime] = []
    cursor, span = start, timedelta(days=1)
    while len(ticks) < CRON_SAMPLE_TICKS and cursor < horizon:
        end = min(cursor + span, horizon)
        # a key is a window [tick, next tick) inside [cursor, end]: the window's last tick comes with the next one
        partitions = dg.TimeWindowPartitionsDefinition(
            cron_schedule=cron, start=cursor, end=end, timezone=timezone, fmt=_TICK_FORMAT
        )
        found = [datetime.strptime(key, _TICK_FORMAT) for key in partitions.get_partition_keys()]
        if found:
            ticks += found
            cursor = found[-1] + timedelta(minutes=1)  # cron ticks are whole minutes apart
        elif end == horizon:
            break
        span *= 2
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    return max(gaps) if gaps else None


def expected_interval(spec: AssetSpecModel) -> timedelta | None:
    """How long the spec lets an asset go without a run: its cron's longest gap, else its sensor's interval
    times ``SENSOR_INTERVAL_FACTOR``; ``None`` without schedule and sensor (a schedule wins: it runs even when
    no file is new, a sensor only when one is)."""
    interval = schedule_interval(spec.schedule.cron, spec.schedule.timezone) if spec.schedule is not None else None
    if interval is not None:
        return interval
    if spec.sensor is not None:
        return timedelta(seconds=spec.sensor.minimum_interval_seconds * SENSOR_INTERVAL_FACTOR)
    return None


def freshness_limit(spec: AssetSpecModel) -> timedelta | None:
    """The age past which the asset's last materialization makes its freshness check fail (WARN)."""
    interval = expected_interval(spec)
    if interval is None:
        return None
    return interval + max(MIN_GRACE, interval * GRACE_SHARE)


def build_freshness_checks(loaded: Sequence[LoadedSpec]) -> list[dg.AssetChecksDefinition]:
    """One ``freshness_check`` per spec with a schedule or a sensor, with that spec's limit."""
    checks: list[dg.AssetChecksDefinition] = []
    for item in loaded:
        limit = freshness_limit(item.spec)
        if limit is None:
            continue
        with warnings.catch_warnings():
            # Dagster points to FreshnessPolicy instead; that is no asset check, and it is set on the asset
            # definition, not beside it
            warnings.simplefilter("ignore", dg.SupersessionWarning)
            checks += dg.build_last_update_freshness_checks(
                assets=[item.spec.name], lower_bound_delta=limit, severity=dg.AssetCheckSeverity.WARN
            )
    return checks


def build_freshness_sensor(checks: Sequence[dg.AssetChecksDefinition]) -> dg.SensorDefinition | None:
    """Dagster's sensor that evaluates the freshness checks whenever one can have become overdue; created
    stopped, like the schedules and sensors whose runs it watches."""
    if not checks:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.SupersessionWarning)
        return dg.build_sensor_for_freshness_checks(
            freshness_checks=checks,
            name=FRESHNESS_SENSOR,
            minimum_interval_seconds=FRESHNESS_SENSOR_INTERVAL_SECONDS,
            default_status=dg.DefaultSensorStatus.STOPPED,
        )
