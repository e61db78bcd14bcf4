"""`mist serve`: Mist as an HTTP service, a durable job queue over the one job runner (`mist.runner.jobs`).

store: tokens, jobs and images in a database; submit: uploads and settings checked as the command line checks them;
worker: the thread that runs queued jobs; app: the FastAPI routes; metrics: Prometheus text; server: start-up and
token commands; options: the command line. Importing this package imports none of the server's libraries.
"""
