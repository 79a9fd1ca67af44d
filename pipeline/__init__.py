"""Thin DVC-stage glue: read params.yaml, call the sunfish library, write outputs, log to MLflow."""
