"""Monitoring: the pipeline exporter (Prometheus metrics from the Prefect event stream)
and traces per object (OpenTelemetry, off unless `OTEL_*` variables are set).

`python -m taxi_pipeline.monitoring` runs the exporter; what it exports is in
docs/monitoring.md.
"""
