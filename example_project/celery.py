"""The Celery application: `celery -A example_project` finds `app` here, by Celery's convention."""

from __future__ import annotations

from celery import Celery

from celery_adaptive.publish_time import stamp_publish_time

# Producers (the load generator, beat, tasks that send tasks) stamp each message's publish
# time, so the pool's metrics measure the queue wait from publish to start.
stamp_publish_time()

app = Celery("example_project", include=["example_project.tasks"])
app.config_from_object("example_project.config")
