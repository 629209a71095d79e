"""The Celery app of the workers that run the steps of ``DATIVO_EXECUTOR=celery`` runs (docs/deployment.md).

    celery -A dativo_dagster.celery_worker worker --concurrency 2 --prefetch-multiplier 1

Dagster's ``dagster_celery.app`` with the broker and result backend of the environment (``DATIVO_CELERY_BROKER_URL``,
``DATIVO_CELERY_BACKEND_URL``), the same ones the code location's executor submits to, so that no URL (and no
password in it) is written into a config file or onto a command line. A worker runs a step's code itself: it needs
the code location's environment (``DATIVO_*``, the S3 credentials) and that of the Dagster instance's storage.
"""

from __future__ import annotations

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from dativo_dagster.executors import celery_urls

_urls = celery_urls({})
app = make_app(CeleryExecutor.for_cli(broker=_urls.broker, backend=_urls.backend).app_args())
execute_plan = create_task(app)

__all__ = ["app", "execute_plan"]
