"""A small Celery application that runs on the celery-adaptive pool.

``celery -A example_project`` finds the app in `example_project.celery` (Celery's convention).
This package imports nothing itself, so `example_project.load` can be used by any client
without creating the app. Tasks: `example_project.tasks`; the mixed load: `example_project.load`.
"""
