"""The web UI (`mist webui`): `pages` holds each browser page's state and runs its jobs through the runner, `app`
builds the gradio page over it, `text` has its words in English and Chinese."""
