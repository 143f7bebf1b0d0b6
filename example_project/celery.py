"""The Celery application: `celery -A example_project` finds `app` here, by Celery's convention."""

from __future__ import annotations

from celery import Celery

app = Celery("example_project", include=["example_project.tasks"])
app.config_from_object("example_project.config")
