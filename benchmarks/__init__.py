"""Benchmarks of VisualSearch: scripts run as ``python benchmarks/<name>.py`` (see README, "Benchmarks").

:mod:`benchmarks.common` holds what the scripts share; :mod:`benchmarks.es_server` starts the
Elasticsearch-API test server that the Elasticsearch benchmarks and the test suite run against.
"""
