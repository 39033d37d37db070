"""Thin DVC stage entry points: read params.yaml (+ --set overrides), call dynadapter, write outputs."""
