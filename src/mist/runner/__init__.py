"""The job runner, under every face: its one entrance (`entrance.open_models`: every check before compute), the
protection of a batch of files (`jobs`, or a Ray cluster's workers: `ray_pool`), evaluation as a job
(`evaluation`), and what jobs need around them: inputs, pre-flight checks, manifests, progress estimates, the
settings' names and kinds as users type them (`flags`), and servers' work limits. It imports the engine, models and
common modules, never a face."""
