"""VisualSearch: hierarchical reverse image search.

``import vslib`` is fast: TensorFlow, FAISS and the Elasticsearch client are
imported by the modules that need them, when they need them.
"""
__version__ = "0.1.0"
