"""The faces: the command line (`cli`), Mist v1.2's command line (`legacy`, behind `mist_v3.py`), the web UI
(`webui`), the HTTP service (`service`), the Python API (`api`, exported by the `mist` package) and the service's
client (`client`). Each is a thin layer over the job runner (`mist.runner`): it turns what its user typed into
settings, opens the runner and shows what it reports. Nothing below imports a face."""
