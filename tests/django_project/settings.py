"""Settings of the small Django project the Django tests run real workers in.

sqlite always (at $TEST_SQLITE_PATH); a PostgreSQL alias ``pg`` with a psycopg connection pool
when $TEST_DJANGO_PG is set (the test sets it only when the server answers and Django >= 5.1
and psycopg_pool are installed).
"""

from __future__ import annotations

import os

SECRET_KEY = "celery-adaptive-tests-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS: list[str] = []
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("TEST_SQLITE_PATH", ":memory:"),
    },
}
if os.environ.get("TEST_DJANGO_PG"):
    DATABASES["pg"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("TEST_PG_NAME", "test"),
        "USER": os.environ.get("TEST_PG_USER", "postgres"),
        "HOST": "127.0.0.1",
        "PORT": "5432",
        "OPTIONS": {"pool": {"min_size": 1, "max_size": 4, "timeout": 10}},
    }
